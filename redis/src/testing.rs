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
    args: Vec<String>,
    /// With TLS: its port and the folder of its certificates.
    tls: Option<(u16, tempfile::TempDir)>,
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
        let child = spawn(&args);
        let server = RedisServer {
            child,
            dir,
            socket,
            args,
            tls: None,
        };
        server.wait_ready();
        server
    }

    /// Starts a server that also listens with TLS on a loopback TCP port, its certificate
    /// (for `localhost` and 127.0.0.1) signed by a certificate authority made for it with
    /// openssl: see [`RedisServer::tls_url`] and [`RedisServer::ca_file`].
    pub fn start_tls() -> Self {
        let certs = tempfile::tempdir().expect("a temp folder for certificates");
        let d = certs.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl (Debian's openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=skiff test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
        ]);
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("write san.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "redis.pem",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let path = |f: &str| d.join(f).to_str().expect("a UTF-8 temp path").to_string();
        let args = [
            "--tls-port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--tls-cert-file".into(),
            path("redis.pem"),
            "--tls-key-file".into(),
            path("redis.key"),
            "--tls-ca-cert-file".into(),
            path("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut server = Self::start_with(&args);
        server.tls = Some((port, certs));
        server
    }

    /// The TLS URL (`rediss://localhost:PORT`) of a server from [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|(port, _)| format!("rediss://localhost:{port}"))
    }

    /// The certificate authority (PEM) that signed its certificate.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|(_, d)| d.path().join("ca.pem"))
    }

    /// Kills the server (SIGKILL: what it had not written to its AOF is lost, as in a crash)
    /// and starts it again on the same folder and socket.
    pub fn crash_and_restart(mut self) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(&self.args);
        self.wait_ready();
        self
    }

    /// Stops the server gracefully (SIGTERM: it writes its AOF and RDB out, as a restart of
    /// the service would) and starts it again on the same folder and socket.
    pub fn restart(mut self) -> Self {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(&self.args);
        self.wait_ready();
        self
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

fn spawn(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server could not start ({e}): install Debian's redis-server")
        })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
