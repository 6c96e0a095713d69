//! A real `redis-server` for tests: started on a unix socket in a temp folder of its own (no TCP
//! port to collide with another suite), stopped when dropped. A missing `redis-server` fails the
//! test loudly: nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts a server with no persistence, listening only on its unix socket.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`--appendonly yes`...).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temp folder for redis-server");
        let socket = dir.path().join("redis.sock");
        let mut args: Vec<String> = [
            "--port",
            "0",
            "--unixsocket",
            socket.to_str().expect("a UTF-8 temp path"),
            "--unixsocketperm",
            "700",
            "--dir",
            dir.path().to_str().expect("a UTF-8 temp path"),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server could not start ({e}): install Debian's redis-server")
            });
        let server = RedisServer { child, dir, socket };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "redis-server did not listen on {} within 10 s",
            self.socket.display()
        );
    }

    /// The URL to reach it (`redis+unix:///.../redis.sock`).
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's folder (its AOF and RDB files, when persistence is on).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id (to stop or kill it in a fault test).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
