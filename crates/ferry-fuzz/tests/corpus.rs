//! Replays the fuzz corpus as ordinary tests: every file of
//! `fuzz/corpus/<target>/` goes through its target, which must not panic;
//! seeds (`ok-*`) must be accepted, and so must the seeds as made today
//! (so a format change that leaves the committed seeds stale shows here).
//! Crashes the fuzzer found are kept as `crash-*` files and stay fixed.

mod seeds;

use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_corpus_file_goes_through_its_target() {
    let mut files = 0;
    for (name, target) in ferry_fuzz::TARGETS {
        let dir = corpus_root().join(name);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        let mut seeds = 0;
        for path in entries {
            let bytes = std::fs::read(&path).unwrap();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let accepted = target(&bytes);
            if file.starts_with("ok-") {
                assert!(accepted, "{name}: seed {file} was refused");
                seeds += 1;
            }
            files += 1;
        }
        assert!(seeds > 0, "{name}: no seeds (ok-*) in {}", dir.display());
    }
    assert!(files > 0);
}

#[test]
fn seeds_as_made_today_are_accepted_and_committed() {
    for seed in seeds::all() {
        let target = ferry_fuzz::target(seed.target).expect("a known target");
        assert!(
            target(&seed.bytes),
            "{}: seed {} was refused",
            seed.target,
            seed.name
        );
        let path = corpus_root()
            .join(seed.target)
            .join(format!("ok-{}", seed.name));
        assert!(
            path.exists(),
            "{} is missing: run `cargo test -p ferry-fuzz -- --ignored write_seeds`",
            path.display()
        );
    }
}

#[test]
fn mutations_of_the_seeds_do_not_panic() {
    // A few thousand cheap mutations per target, so that `cargo test`
    // alone already shakes every parser a little (the fuzzer goes much
    // further: scripts/fuzz.sh).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for seed in seeds::all() {
        let target = ferry_fuzz::target(seed.target).unwrap();
        for _ in 0..300 {
            let mut b = seed.bytes.clone();
            for _ in 0..=(next() % 4) {
                let at = (next() % (b.len() as u64 + 1)) as usize;
                match next() % 4 {
                    0 if at < b.len() => b[at] = next() as u8,
                    1 if at < b.len() => {
                        b.remove(at);
                    }
                    2 => b.insert(at, next() as u8),
                    _ => b.truncate(at),
                }
            }
            target(&b);
        }
    }
}

/// Writes the seeds into the corpus: run after a change of format.
#[test]
#[ignore]
fn write_seeds() {
    for seed in seeds::all() {
        let dir = corpus_root().join(seed.target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("ok-{}", seed.name)), &seed.bytes).unwrap();
    }
}
