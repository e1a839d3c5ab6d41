//! A server running on a thread of its own, for blocking callers (the CLI,
//! tests): the registry and the boot service both hand one out, so that
//! stopping, joining and the stop-on-drop live in one place.

use std::fmt::Display;
use std::thread::JoinHandle;

/// A server on its own thread. Dropping it stops the server and waits for
/// the thread; an error the server ended with is then logged (use
/// [`ServerThread::stop`] to get it instead).
#[derive(Debug)]
pub struct ServerThread<E: Display> {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), E>>>,
}

impl<E: Display> ServerThread<E> {
    /// Starts a thread called `name` running `serve`, which gets the future
    /// that completes when the server is asked to stop.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn spawn<F>(name: &str, serve: F) -> std::io::Result<Self>
    where
        F: FnOnce(StopSignal) -> Result<(), E> + Send + 'static,
        E: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || serve(StopSignal(rx)))?;
        Ok(ServerThread {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the server and waits until it has stopped.
    ///
    /// # Errors
    /// What the server failed with, if it did.
    pub fn stop(mut self) -> Result<(), E> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), E> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl<E: Display> Drop for ServerThread<E> {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!("{e}");
        }
    }
}

/// Completes when the [`ServerThread`] is stopped or dropped: a server's
/// graceful-shutdown future.
#[derive(Debug)]
pub struct StopSignal(tokio::sync::oneshot::Receiver<()>);

impl StopSignal {
    /// Waits for the stop.
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_returns_the_servers_error_and_drop_stops_it() {
        let t = ServerThread::spawn("t", |stop: StopSignal| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(stop.wait());
            Err::<(), String>("ended".into())
        })
        .unwrap();
        assert_eq!(t.stop(), Err("ended".to_string()));

        let (tx, rx) = std::sync::mpsc::channel();
        let t = ServerThread::spawn("t", move |stop: StopSignal| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(stop.wait());
            tx.send(()).unwrap();
            Ok::<(), String>(())
        })
        .unwrap();
        drop(t);
        rx.try_recv().expect("drop waited for the server to stop");
    }
}
