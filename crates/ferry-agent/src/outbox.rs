//! Every write to the port.
//!
//! One writer thread owns the port's write side and takes whole encoded
//! frames from a queue, so frames never interleave and no handler ever
//! blocks on the port. That matters because a virtio-serial `write` does
//! *not* fail or drop data while the host end is closed: the guest kernel
//! blocks it until the host connects (`will_write_block` in
//! `drivers/char/virtio_console.c`). With a mutex-guarded writer a single
//! event sent before the host attached would wedge every handler, shutdown
//! included.
//!
//! Replies are tagged with the connection *epoch* in which their request
//! arrived; the reader bumps the epoch whenever it sees the host go away.
//! A reply whose host has gone is dropped rather than delivered to the next
//! host (a new engine process after a restore), whose request ids may
//! collide. Events (id 0) are always delivered, late if need be.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent_proto::{encode, Reply};

use crate::reaper::lock;

/// A port's write side.
pub type PortWriter = Box<dyn Write + Send>;

enum Item {
    Frame {
        line: Vec<u8>,
        /// `None` for events, which survive reconnections.
        epoch: Option<u64>,
        /// Told once the frame has been written (or dropped).
        written: Option<Sender<()>>,
    },
    /// A newly opened port replaces the old one.
    Attach(PortWriter),
    /// The port is being reopened: close it (a virtio-serial port can be
    /// open only once) and hold frames until the next `Attach`.
    Detach(Sender<()>),
}

/// The queue of outgoing frames.
pub struct Outbox {
    tx: Sender<Item>,
    /// Taken by the writer thread when the port is first attached.
    rx: Mutex<Option<Receiver<Item>>>,
    epoch: Arc<AtomicU64>,
}

impl Outbox {
    /// Creates the queue. Frames queue up until a port is [`attach`]ed.
    ///
    /// [`attach`]: Outbox::attach
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts writing to `writer`, replacing any previous port.
    ///
    /// # Errors
    /// The writer thread could not be created.
    pub fn attach(&self, writer: PortWriter) -> std::io::Result<()> {
        let Some(rx) = lock(&self.rx).take() else {
            let _ = self.tx.send(Item::Attach(writer));
            return Ok(());
        };
        let epoch = Arc::clone(&self.epoch);
        let spawned = std::thread::Builder::new()
            .name("port-writer".into())
            .spawn(move || write_forever(writer, &rx, &epoch));
        spawned.map(drop)
    }

    /// Closes the port's write side before the port is reopened, waiting up
    /// to `timeout` for the writer thread to let go of it.
    pub fn detach(&self, timeout: Duration) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Item::Detach(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }

    /// The current connection epoch, to tag a request with.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Notes that the host went away: replies still queued for it are dropped.
    pub fn host_gone(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Queues the reply to request `id`, received in `epoch`.
    pub fn reply(&self, id: u64, epoch: u64, reply: &Reply) {
        self.push(id, Some(epoch), reply, None);
    }

    /// Queues an unsolicited event (id 0).
    pub fn event(&self, event: &Reply) {
        self.push(0, None, event, None);
    }

    /// Queues a reply and waits up to `timeout` for it to be written.
    /// Returns whether it was.
    pub fn reply_and_wait(&self, id: u64, epoch: u64, reply: &Reply, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.push(id, Some(epoch), reply, Some(tx));
        rx.recv_timeout(timeout).is_ok()
    }

    fn push(&self, id: u64, epoch: Option<u64>, body: &Reply, written: Option<Sender<()>>) {
        let line = encode(id, body);
        let _ = self.tx.send(Item::Frame {
            line,
            epoch,
            written,
        });
    }
}

fn write_forever(writer: PortWriter, rx: &Receiver<Item>, epoch: &AtomicU64) {
    let mut writer = Some(writer);
    // Frames that arrive while the port is being reopened.
    let mut held: VecDeque<Item> = VecDeque::new();
    // Log a failing port once, not once per frame.
    let mut failing = false;
    loop {
        let item = match writer.is_some().then(|| held.pop_front()).flatten() {
            Some(item) => item,
            None => match rx.recv() {
                Ok(item) => item,
                Err(_) => return,
            },
        };
        match item {
            Item::Attach(new) => {
                writer = Some(new);
                failing = false;
            }
            Item::Detach(done) => {
                writer = None;
                let _ = done.send(());
            }
            frame @ Item::Frame { .. } if writer.is_none() => held.push_back(frame),
            Item::Frame {
                line,
                epoch: tagged,
                written,
            } => {
                if tagged.is_some_and(|e| e != epoch.load(Ordering::SeqCst)) {
                    debug!("dropping a reply for a host that went away");
                } else if let Some(port) = writer.as_mut() {
                    match port.write_all(&line).and_then(|()| port.flush()) {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            info!("writing to the port failed: {e}");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
                if let Some(written) = written {
                    let _ = written.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn drops_replies_of_a_previous_connection_but_not_events() {
        let outbox = Outbox::new();
        let old = outbox.epoch();
        outbox.reply(5, old, &Reply::ShuttingDown);
        outbox.host_gone();
        outbox.event(&Reply::Live { uptime_ms: 1 });
        outbox.reply(6, outbox.epoch(), &Reply::ShuttingDown);
        let sink = Sink::default();
        outbox.attach(Box::new(sink.clone())).unwrap();
        let epoch = outbox.epoch();
        assert!(outbox.reply_and_wait(7, epoch, &Reply::ShuttingDown, Duration::from_secs(5)));
        let text = String::from_utf8(lock(&sink.0).clone()).unwrap();
        let ids: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids, vec![0, 6, 7]);

        // Frames sent while the port is reopened wait for the new one.
        outbox.detach(Duration::from_secs(5));
        outbox.event(&Reply::Live { uptime_ms: 2 });
        let second = Sink::default();
        outbox.attach(Box::new(second.clone())).unwrap();
        assert!(outbox.reply_and_wait(8, epoch, &Reply::ShuttingDown, Duration::from_secs(5)));
        assert_eq!(lock(&sink.0).len(), text.len());
        let text = String::from_utf8(lock(&second.0).clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
    }
}
