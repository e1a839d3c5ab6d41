//! Holes in a sparse input are zero chunks, skipped without being read, and
//! the data around them round-trips.

mod common;

use std::io::{Seek, SeekFrom, Write};

use ferry_package::{Package, PackageWriter, SectionKind};

#[test]
fn holes_become_zero_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("disk.raw");
    let chunk = 64 * 1024u64;
    let mut f = std::fs::File::create(&input).unwrap();
    f.set_len(chunk * 64).unwrap(); // all hole
    f.seek(SeekFrom::Start(chunk * 10 + 100)).unwrap();
    f.write_all(b"data in chunk ten").unwrap();
    f.seek(SeekFrom::Start(chunk * 63)).unwrap();
    f.write_all(&vec![7u8; chunk as usize]).unwrap();
    drop(f);

    let out = dir.path().join("p.ferry");
    let mut w = PackageWriter::create(&out).unwrap();
    w.add_file(SectionKind::Disk, &input, chunk, None, &mut |_, _| {})
        .unwrap();
    assert_eq!(w.stats().zero_chunks, 62);
    w.commit(&common::vm_meta(0)).unwrap();

    let pkg = Package::open(&out).unwrap();
    let s = pkg.section(SectionKind::Disk).unwrap();
    assert_eq!(s.stored_chunks(), 2);
    let back = dir.path().join("back.raw");
    pkg.extract(SectionKind::Disk, &back, &mut |_, _| {})
        .unwrap();
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&input).unwrap()
    );
}
