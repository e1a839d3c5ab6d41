//! `ferry shell` driven as a person would: through a terminal (a private
//! tmux server: type, read the screen), with real QEMU and real guests.
//! It must work with the service killed, the guest network down, the
//! agent hung, and in an image with no shell or tools of its own.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use ferry_test_support::{
    blueprint, describe, fixtures_dir, guest_binary, spawn_until_live, vm_lock, wait_until,
    workspace_root, FerryEnv,
};

fn env() -> FerryEnv {
    FerryEnv::new(env!("CARGO_BIN_EXE_ferry"))
}

/// `ferry shell VM -- ARGS` with `stdin` piped in.
fn shell(env: &FerryEnv, vm: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = env
        .cmd()
        .args(["shell", vm, "--"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry shell");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private tmux server: its sessions are terminals a test types into.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is missing: run scripts/setup.sh (apt-get install tmux)"
        );
        Self {
            socket: format!("ferry-test-{tag}-{}", std::process::id()),
        }
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    /// Starts `ferry shell VM` in a new `cols` x `rows` terminal `name`.
    fn open(&self, env: &FerryEnv, name: &str, vm: &str, cols: u16, rows: u16) {
        self.open_ferry(env, name, &format!("shell {vm}"), cols, rows);
    }

    /// Starts `ferry ARGS` in a new `cols` x `rows` terminal `name`; when
    /// it ends, the terminal shows `ferry-shell-exited=CODE`.
    fn open_ferry(&self, env: &FerryEnv, name: &str, args: &str, cols: u16, rows: u16) {
        let ferry = env.ferry.to_str().unwrap();
        let command = format!(
            "env FERRY_STATE={} TERM=xterm {ferry} {args}; echo ferry-shell-exited=$?; sleep 600",
            env.state.path().display()
        );
        let out = self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            &command,
        ]);
        assert!(out.status.success(), "{}", describe(&out));
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(out.status.success(), "{}", describe(&out));
    }

    /// Types `line` and Enter.
    fn line(&self, name: &str, line: &str) {
        self.keys(name, &["-l", line]);
        self.keys(name, &["Enter"]);
    }

    fn screen(&self, name: &str) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-J", "-S", "-200", "-t", name]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `text` (`count` times in all).
    fn wait_for(&self, name: &str, text: &str, count: usize, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen(name);
            if screen.matches(text).count() >= count {
                return screen;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {count} x {text:?} on terminal {name}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn resize(&self, name: &str, cols: u16, rows: u16) {
        let out = self.tmux(&[
            "resize-window",
            "-t",
            name,
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
        assert!(out.status.success(), "{}", describe(&out));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

const T: Duration = Duration::from_secs(30);

/// The checks a person would make in a shell in the tiny VM: the
/// service's process, the network, the mounts, the service's files.
fn look_around(tmux: &Tmux, term: &str, n: usize, service: &str) {
    tmux.line(term, "ps; echo ps-done");
    let screen = tmux.wait_for(term, "\nps-done", n, T);
    assert!(screen.contains(service), "ps shows the service:\n{screen}");
    tmux.line(term, "ip addr show eth0; mount; echo look-done");
    let screen = tmux.wait_for(term, "\nlook-done", n, T);
    assert!(screen.contains("eth0"), "{screen}");
    assert!(screen.contains("/dev/vda on / type ext4"), "{screen}");
}

#[test]
fn commands_exit_codes_pipes_and_several_at_once() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let (_boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "sh-cmd",
        ],
        Duration::from_secs(120),
    );

    // The exit code propagates; stdout and stderr stay apart.
    let out = shell(
        &env,
        "sh-cmd",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // Standard input as a pipe, a big one.
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let out = shell(&env, "sh-cmd", &["wc", "-l"], &input);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(stdout(&out).trim(), "200000");

    // A command that does not exist: 127, as from a shell.
    let out = shell(&env, "sh-cmd", &["no-such-command"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));

    // A signal's death is 128 + its number.
    let out = shell(&env, "sh-cmd", &["sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(out.status.code(), Some(143), "{}", describe(&out));

    // Several at once: each sees its own session.
    let children: Vec<_> = (0..4)
        .map(|i| {
            env.cmd()
                .args(["shell", "sh-cmd", "--", "sh", "-c"])
                .arg(format!("sleep 1; echo session-{i}; exit {i}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(i as i32), "{}", describe(&out));
        assert_eq!(stdout(&out), format!("session-{i}\n"));
    }

    // A hung guest (its QEMU stopped): a clear error in bounded time.
    let qemu = ferry_test_support::qemu_pids("sh-cmd");
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    ferry_test_support::send_signal(qemu[0], libc::SIGSTOP);
    let started = Instant::now();
    let out = shell(&env, "sh-cmd", &["true"], b"");
    ferry_test_support::send_signal(qemu[0], libc::SIGCONT);
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer within 10 s"),
        "{}",
        describe(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    // And it recovers.
    let out = shell(&env, "sh-cmd", &["true"], b"");
    assert!(out.status.success(), "{}", describe(&out));

    // Another user may not, even where the files let him reach the socket.
    {
        use std::os::unix::fs::PermissionsExt;
        // State directories are 0700: open the path down to the VM's
        // directory, so that only the socket's own check stands between.
        let vm_dir = env.state.path().join("vms").join("sh-cmd");
        for dir in vm_dir.ancestors().take(3) {
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(dir, open).unwrap();
        }
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&env.ferry)
        .args(["shell", "sh-cmd", "--", "true"])
        .env("FERRY_STATE", env.state.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not allowed: uid 65534"),
        "{}",
        describe(&out)
    );

    // Bad input: no such VM.
    let out = shell(&env, "no-such-vm", &["true"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running VM is named 'no-such-vm'"),
        "{}",
        describe(&out)
    );
}

#[test]
fn interactive_shell_through_a_terminal() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let (_boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "sh-pty",
        ],
        Duration::from_secs(120),
    );
    let tmux = Tmux::new("pty");
    tmux.open(&env, "a", "sh-pty", 100, 30);
    tmux.open(&env, "b", "sh-pty", 80, 24);
    tmux.wait_for("a", "ferry-tiny:/# ", 1, T);
    tmux.wait_for("b", "ferry-tiny:/# ", 1, T);

    // ps shows the service; the network, mounts and files are visible.
    look_around(&tmux, "a", 1, "httpd -f -p 8080");
    tmux.line("a", "cat /srv/www/index.html");
    tmux.wait_for("a", "hello from a ferry tiny guest", 1, T);

    // It is a real terminal, of the client's size; a resize reaches it.
    tmux.line("a", "tty; stty size");
    let screen = tmux.wait_for("a", "30 100", 1, T);
    assert!(screen.contains("/dev/pts/"), "{screen}");
    tmux.resize("a", 120, 40);
    std::thread::sleep(Duration::from_millis(500));
    tmux.line("a", "stty size");
    tmux.wait_for("a", "40 120", 1, T);
    // The other session has its own size.
    tmux.line("b", "stty size");
    tmux.wait_for("b", "24 80", 1, T);

    // Ctrl-C interrupts a guest sleep, not the shell.
    tmux.line("a", "sleep 600");
    std::thread::sleep(Duration::from_millis(700));
    tmux.keys("a", &["C-c"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux.line("a", "echo sleep-ended=$?");
    tmux.wait_for("a", "\nsleep-ended=130", 1, T);
    tmux.line("a", "echo still-here");
    tmux.wait_for("a", "\nstill-here", 1, T);

    // Exiting one shell ends that ferry shell with 0 and leaves the VM and
    // the other shell alone.
    tmux.line("a", "exit");
    tmux.wait_for("a", "ferry-shell-exited=0", 1, T);
    tmux.line("b", "echo b-alive");
    tmux.wait_for("b", "\nb-alive", 1, T);
    let out = env.run(&["exec", "sh-pty", "--", "true"]);
    assert!(out.status.success(), "{}", describe(&out));

    // A closed terminal hangs its session up: nothing stays in the guest.
    tmux.line("b", "sleep 777");
    std::thread::sleep(Duration::from_millis(700));
    let _ = tmux.tmux(&["kill-session", "-t", "b"]);
    wait_until(Duration::from_secs(20), "the hung-up sleep to go", || {
        let out = shell(&env, "sh-pty", &["ps"], b"");
        (!stdout(&out).contains("sleep 777")).then_some(())
    });
}

#[test]
fn shell_works_with_the_service_killed_and_the_network_down() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    let (_boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "sh-broken",
        ],
        Duration::from_secs(120),
    );
    let out = shell(
        &env,
        "sh-broken",
        &["sh", "-c", "kill -9 $(pidof httpd); ip link set eth0 down"],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let tmux = Tmux::new("broken");
    tmux.open(&env, "a", "sh-broken", 100, 30);
    tmux.wait_for("a", "ferry-tiny:/# ", 1, T);
    tmux.line("a", "ps; ip link show eth0; echo check-done");
    let screen = tmux.wait_for("a", "\ncheck-done", 1, T);
    assert!(
        !screen.contains("httpd -f"),
        "the service is dead:\n{screen}"
    );
    assert!(
        screen.contains("eth0: <BROADCAST,MULTICAST> "),
        "eth0 is down:\n{screen}"
    );
    tmux.line("a", "echo $((6*7))");
    tmux.wait_for("a", "\n42", 1, T);
}

/// A blueprint with no shell or tools on its disk (`rootfs.kind =
/// "empty"`, the service is ferry-web) whose agent hangs once live
/// (the test-only kernel flag `ferry.test.hang-agent`).
fn bare_hung_blueprint(env: &FerryEnv) -> PathBuf {
    guest_binary("ferry-web");
    let text = std::fs::read_to_string(workspace_root().join("recipes/web.toml"))
        .unwrap()
        .replace("name = \"web\"", "name = \"bare\"")
        .replace("kind = \"busybox\"", "kind = \"empty\"")
        .replace("init_on_free=1\"", "init_on_free=1 ferry.test.hang-agent\"");
    assert!(text.contains("kind = \"empty\"") && text.contains("hang-agent"));
    let recipe = fixtures_dir().join("shell-bare.toml");
    std::fs::write(&recipe, text).unwrap();
    let bp = env.state.path().join("bare");
    let out = env.run(&[
        "blueprint",
        "build",
        "--quiet",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        bp.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    bp
}

#[test]
fn shell_works_with_a_hung_agent_and_no_shell_in_the_image() {
    let _lock = vm_lock();
    let env = env();
    let bp = bare_hung_blueprint(&env);
    let (_boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "sh-bare",
        ],
        Duration::from_secs(120),
    );
    // The agent answers nothing any more.
    let started = Instant::now();
    let mut exec = env
        .cmd()
        .args(["exec", "sh-bare", "--timeout", "1", "--", "true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    if exec.try_wait().unwrap().is_some() {
        let out = exec.wait_with_output().unwrap();
        panic!(
            "exec through the hung agent should not have finished: {}",
            describe(&out)
        );
    }
    let _ = exec.kill();
    let _ = exec.wait();
    assert!(started.elapsed() >= Duration::from_secs(4));

    // The image has no shell of its own; ferry's comes from /ferry.
    let out = shell(
        &env,
        "sh-bare",
        &["/ferry/bin/sh", "-c", "ls /bin /usr/bin 2>&1; echo ok"],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("No such file"), "{}", describe(&out));

    let tmux = Tmux::new("bare");
    tmux.open(&env, "a", "sh-bare", 100, 30);
    tmux.wait_for("a", "ferry-bare:/# ", 1, T);
    look_around(&tmux, "a", 1, "ferry-web --listen");
    tmux.line("a", "ls /var/lib/ferry-web && echo files-ok");
    tmux.wait_for("a", "\nfiles-ok", 1, T);
}

/// Stops the test's detached VMs, whatever happens.
struct Fleet<'a>(&'a FerryEnv);

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--all", "--discard"]);
    }
}

#[test]
fn watch_on_error_shell_opens_a_shell_in_the_failing_vm_of_a_fleet() {
    let _lock = vm_lock();
    let env = env();
    let pkg = common::tiny_package(&env);
    let _fleet = Fleet(&env);
    let out = env.run(&[
        "up",
        "--package",
        pkg.to_str().unwrap(),
        "-n",
        "2",
        "--name-prefix",
        "w",
    ]);
    assert!(out.status.success(), "{}", describe(&out));

    // Detached clones of a package have the shell channel too.
    let out = shell(
        &env,
        "w-0",
        &["sh", "-c", "echo i-am-w-0 > /root/marker"],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));
    let out = shell(
        &env,
        "w-1",
        &["sh", "-c", "echo i-am-w-1 > /root/marker"],
        b"",
    );
    assert!(out.status.success(), "{}", describe(&out));

    let tmux = Tmux::new("watch");
    tmux.open_ferry(&env, "w", "watch --all --on-error shell", 100, 30);
    tmux.wait_for("w", "watching every VM", 1, T);
    // A report-only watch beside it, as a pipe.
    let mut report = env
        .cmd()
        .args(["watch", "w-0", "w-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // w-1's service crashes.
    let out = env.run(&["exec", "w-1", "--", "sh", "-c", "kill -9 $(pidof httpd)"]);
    assert!(out.status.success(), "{}", describe(&out));

    // Clones are named after their VM: the prompt says which it is.
    let screen = tmux.wait_for("w", "w-1:/# ", 1, T);
    assert!(
        screen.contains("[VM w-1 error] service exited with code 137 (killed by signal 9)"),
        "{screen}"
    );
    assert!(!screen.contains("[VM w-0 error]"), "{screen}");
    tmux.line("w", "cat /root/marker");
    tmux.wait_for("w", "\ni-am-w-1", 1, T);
    tmux.line("w", "exit 5");
    tmux.wait_for("w", "ferry-shell-exited=5", 1, T);

    // The same error in ps --json, ferry logs and the report-only watch.
    let out = env.run(&["ps", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let w1 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "w-1")
        .unwrap();
    assert_eq!(w1["last_error"]["kind"], "service-exited", "{rows}");
    let w0 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "w-0")
        .unwrap();
    assert!(w0["last_error"].is_null(), "{rows}");
    let out = env.run(&["logs", "w-1"]);
    assert!(
        stdout(&out).contains("[ferry] error: service exited with code 137"),
        "{}",
        describe(&out)
    );
    // A suspended VM: say so, and how to resume it.
    let out = env.run(&["stop", "w-0"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = shell(&env, "w-0", &["true"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("'ferry start w-0' resumes it"),
        "{}",
        describe(&out)
    );
    let _ = report.kill();
    let out = report.wait_with_output().unwrap();
    assert_eq!(
        stdout(&out),
        "[VM w-1 error] service exited with code 137 (killed by signal 9)\n"
    );
}

#[test]
fn watch_reports_a_failed_liveness_check_and_runs_a_command_on_error() {
    let _lock = vm_lock();
    let env = env();
    // The service is a sleep beside a daemonised httpd: killing httpd fails
    // the liveness check while the service runs on.
    let text = std::fs::read_to_string(workspace_root().join("recipes/tiny.toml"))
        .unwrap()
        .replace("name = \"tiny\"", "name = \"flaky\"")
        .replace(
            "command = [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/srv/www\"]",
            "command = [\"sh\", \"-c\", \"httpd -p 8080 -h /srv/www; exec sleep 1000000\"]",
        );
    assert!(text.contains("exec sleep"), "{text}");
    let recipe = fixtures_dir().join("shell-flaky.toml");
    std::fs::write(&recipe, text).unwrap();
    let bp = env.state.path().join("flaky");
    let out = env.run(&[
        "blueprint",
        "build",
        "--quiet",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        bp.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let (_boot, _) = spawn_until_live(
        &env,
        &[
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "sh-flaky",
        ],
        Duration::from_secs(120),
    );
    let mut watch = env
        .cmd()
        .args([
            "watch",
            "sh-flaky",
            "--on-error",
            "exec",
            "sh",
            "-c",
            "echo on-error-ran; cat /srv/www/index.html",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = shell(&env, "sh-flaky", &["sh", "-c", "killall httpd"], b"");
    assert!(out.status.success(), "{}", describe(&out));
    wait_until(Duration::from_secs(60), "the liveness failure", || {
        let out = env.run(&["ps", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (rows[0]["last_error"]["kind"] == "liveness-failed").then_some(())
    });
    // The on-error command has run by the time the error is recorded,
    // or very soon after.
    std::thread::sleep(Duration::from_secs(3));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "[VM sh-flaky error] service failed its liveness check (it still runs)\non-error-ran\nhello from a ferry tiny guest\n"
        ),
        "{text}"
    );
    // The service itself runs on.
    let out = shell(&env, "sh-flaky", &["pidof", "sleep"], b"");
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn a_vm_from_a_package_without_the_shell_channel_falls_back_or_refuses() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    // A package with the devices of one made before the shell channel.
    let pkg = env.state.path().join("old.ferry");
    let out = env
        .cmd()
        .env("FERRY_SHELL_PORT", "off")
        .args([
            "package",
            "--blueprint",
            bp.to_str().unwrap(),
            "--out",
            pkg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    // Resumed by a ferry that has the channel: same devices as saved.
    let (_run, _) = spawn_until_live(
        &env,
        &[
            "run",
            "--package",
            pkg.to_str().unwrap(),
            "--clone",
            "--name",
            "sh-old",
        ],
        Duration::from_secs(120),
    );
    // A command falls back to the agent, with a note.
    let out = shell(
        &env,
        "sh-old",
        &["sh", "-c", "cat; echo out; exit 4"],
        b"in\n",
    );
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(stdout(&out), "in\nout\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("note: VM 'sh-old' has no shell channel"),
        "{}",
        describe(&out)
    );
    // An interactive shell is refused, naming the fix.
    let out = env
        .cmd()
        .args(["shell", "sh-old"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("re-package it"),
        "{}",
        describe(&out)
    );
}

/// The `ps --json` row of VM `name`.
fn ps_row(env: &FerryEnv, name: &str) -> serde_json::Value {
    let out = env.run(&["ps", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Real guest errors, not console lines made up: the OOM killer in a
/// small guest and a kernel panic (sysrq), each seen by `ferry watch`,
/// `ps --json` and `ferry logs`; and a guest that hangs while a session is
/// open ends `ferry shell` with a timeout and leaves nothing running.
/// (This kernel has no way to cause an oops on purpose: no lkdtm, and
/// sysrq's crash is a panic.)
#[test]
fn real_oom_and_kernel_panic_and_a_guest_that_hangs_mid_session() {
    let _lock = vm_lock();
    let env = env();
    let bp = blueprint("tiny");
    // A small guest, detached (a VM that died stays in `ps` with its logs).
    let pkg = env.state.path().join("small.ferry");
    let out = env.run(&[
        "package",
        "--blueprint",
        bp.to_str().unwrap(),
        "--memory-size",
        "128",
        "--out",
        pkg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let _fleet = Fleet(&env);
    let out = env.run(&[
        "up",
        "--package",
        pkg.to_str().unwrap(),
        "-n",
        "2",
        "--name-prefix",
        "e",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let mut watch = env
        .cmd()
        .args(["watch", "e-0", "e-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let watched = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        use std::io::BufRead;
        let watched = watched.clone();
        let lines = std::io::BufReader::new(watch.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let mut w = watched.lock().unwrap();
                w.push_str(&line);
                w.push('\n');
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));

    // The OOM killer: a memory hog in 128 MiB.
    let out = shell(&env, "e-0", &["tail", "/dev/zero"], b"");
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let e0 = wait_until(Duration::from_secs(30), "the OOM error in ps", || {
        let row = ps_row(&env, "e-0");
        (row["last_error"]["kind"] == "oom").then_some(row)
    });
    let what = e0["last_error"]["what"].as_str().unwrap().to_string();
    assert!(
        what.starts_with("kernel: Out of memory: Killed process ") && what.contains(" (tail) "),
        "{e0}"
    );
    let out = env.run(&["logs", "e-0"]);
    assert!(
        stdout(&out).contains(&format!("[ferry] error: {what}")),
        "{}",
        describe(&out)
    );
    // The VM lives on.
    let out = shell(&env, "e-0", &["true"], b"");
    assert!(out.status.success(), "{}", describe(&out));

    // Ctrl-C on a piped `ferry shell` (SIGINT to the client) leaves
    // nothing running in the guest.
    let child = env
        .cmd()
        .args(["shell", "e-0", "--", "sleep", "432"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the sleep to run", || {
        let out = shell(&env, "e-0", &["ps"], b"");
        stdout(&out).contains("sleep 432").then_some(())
    });
    ferry_test_support::send_signal(child.id(), libc::SIGINT);
    let mut child = child;
    let _ = child.wait();
    wait_until(
        Duration::from_secs(20),
        "the interrupted sleep to go",
        || {
            let out = shell(&env, "e-0", &["ps"], b"");
            (out.status.success() && !stdout(&out).contains("sleep 432")).then_some(())
        },
    );

    // A guest that hangs (its QEMU stopped) while a session is open: a
    // timeout with a clear error, not a hang.
    let mut child = env
        .cmd()
        .args(["shell", "e-0", "--", "sleep", "321"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the sleep to run", || {
        let out = shell(&env, "e-0", &["ps"], b"");
        stdout(&out).contains("sleep 321").then_some(())
    });
    let qemu = ferry_test_support::qemu_pids("e-0");
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    ferry_test_support::send_signal(qemu[0], libc::SIGSTOP);
    let stopped = Instant::now();
    let ended = wait_until(Duration::from_secs(40), "ferry shell to give up", || {
        child.try_wait().unwrap()
    });
    let waited = stopped.elapsed();
    ferry_test_support::send_signal(qemu[0], libc::SIGCONT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(ended.code(), Some(5), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer within 20 s"),
        "{}",
        describe(&out)
    );
    assert!(
        waited >= Duration::from_secs(15) && waited < Duration::from_secs(35),
        "{waited:?}"
    );
    // Once the guest runs again, the abandoned session is hung up.
    wait_until(Duration::from_secs(30), "the abandoned sleep to go", || {
        let out = shell(&env, "e-0", &["ps"], b"");
        (out.status.success() && !stdout(&out).contains("sleep 321")).then_some(())
    });

    // A kernel panic.
    let out = shell(
        &env,
        "e-1",
        &["sh", "-c", "echo c > /proc/sysrq-trigger"],
        b"",
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let e1 = wait_until(Duration::from_secs(30), "the panicked VM in ps", || {
        let row = ps_row(&env, "e-1");
        (row["state"] == "crashed").then_some(row)
    });
    assert_eq!(e1["last_error"]["kind"], "kernel-panic", "{e1}");
    assert_eq!(
        e1["last_error"]["what"], "kernel: Kernel panic - not syncing: sysrq triggered crash",
        "{e1}"
    );
    let out = env.run(&["ps"]);
    assert!(
        stdout(&out).contains("the guest kernel panicked"),
        "{}",
        describe(&out)
    );
    let out = env.run(&["logs", "e-1"]);
    assert!(
        stdout(&out)
            .contains("[ferry] error: kernel: Kernel panic - not syncing: sysrq triggered crash"),
        "{}",
        describe(&out)
    );
    // A shell into the dead VM says so.
    let out = shell(&env, "e-1", &["true"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "VM 'e-1' is crashed, not running: it has no saved state to resume ('ferry ps' says why it ended; 'ferry rm e-1' removes it)"
        ),
        "{}",
        describe(&out)
    );

    let want = format!(
        "[VM e-0 error] {what}\n[VM e-1 error] kernel: Kernel panic - not syncing: sysrq triggered crash\n"
    );
    let waited = wait_until(
        Duration::from_secs(10),
        "both lines from ferry watch",
        || {
            let w = watched.lock().unwrap().clone();
            (w.lines().count() >= 2).then_some(w)
        },
    );
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(waited, want);
}

/// A guest kernel without `virtio_console` (the module blacklisted on its
/// command line) lacks what both the shell channel and the agent need: it
/// never becomes a VM, `ferry boot` names the module, and `ferry shell`
/// into it, during the boot or after, ends at once or within the guest
/// timeout, never hangs.
#[test]
fn a_guest_kernel_without_virtio_console_is_refused_by_name() {
    let _lock = vm_lock();
    let env = env();
    let text = std::fs::read_to_string(workspace_root().join("recipes/tiny.toml"))
        .unwrap()
        .replace("name = \"tiny\"", "name = \"novc\"")
        .replace(
            "init_on_free=1\"",
            "init_on_free=1 module_blacklist=virtio_console\"",
        );
    assert!(text.contains("module_blacklist"), "{text}");
    let recipe = fixtures_dir().join("shell-novc.toml");
    std::fs::write(&recipe, text).unwrap();
    let bp = env.state.path().join("novc");
    let out = env.run(&[
        "blueprint",
        "build",
        "--quiet",
        "--recipe",
        recipe.to_str().unwrap(),
        "--out",
        bp.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let started = Instant::now();
    let boot = env
        .cmd()
        .args([
            "boot",
            "--blueprint",
            bp.to_str().unwrap(),
            "--name",
            "novc",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let boot = ferry_test_support::KillOnDrop::new(boot);
    // A shell asked for while it boots.
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let out = shell(&env, "novc", &["true"], b"");
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "{:?}",
        asked.elapsed()
    );
    let out = boot.into_inner().wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot load module virtio_console"),
        "{}",
        describe(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let out = shell(&env, "novc", &["true"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running VM is named 'novc'"),
        "{}",
        describe(&out)
    );
}
