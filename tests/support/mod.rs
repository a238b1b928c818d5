//! Test harness: private `redis-server` processes on free loopback ports.
//!
//! Each server belongs to the test that started it: it is stopped, frozen
//! and killed by its own pid only, never by name, and never touches the
//! Redis that may already listen on 6379.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra_args: Vec<String>,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("no free loopback port");
    listener.local_addr().expect("listener has an address").port()
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, e.g.
    /// `["--maxmemory", "1mb"]`.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cache-runtime-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server =
            Self { port, child: None, dir, extra_args: extra_args.iter().map(|s| s.to_string()).collect() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (apt-get install redis-server)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
            {
                match redis::cmd("PING").query::<String>(&mut conn) {
                    Ok(_) => return,
                    // A server started with --requirepass answers, just not to us.
                    Err(e) if e.to_string().contains("NOAUTH") => return,
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// The URL of a Redis that was running and is gone: connections to it
    /// are refused.
    pub fn dead_url() -> String {
        let mut server = Self::start();
        server.kill();
        server.url()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// A plain synchronous connection for inspecting the server.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("server answers")
    }

    /// SIGKILL, by pid, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Wait until the port is really free, so a restart can take it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a new server process on the same port (with empty data).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("kill(1) is available");
        assert!(status.success(), "kill {signal} {} failed", self.pid());
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `freeze`.
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server would ignore nothing, but make sure it can die.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stands in for a database row that write paths change, counting reads.
pub struct Db {
    pub price: std::sync::atomic::AtomicU32,
    pub reads: std::sync::atomic::AtomicUsize,
}

impl Db {
    pub fn new(price: u32) -> Self {
        Self { price: price.into(), reads: 0.into() }
    }

    pub fn read(&self) -> u32 {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.price.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set(&self, price: u32) {
        self.price.store(price, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A cache builder for a private server with generous deadlines: tests
/// that count computations must not see a slow CI machine turn a hit into a
/// fall-through.
pub fn patient_cache(url: &str, key_prefix: &str) -> cache_runtime::CacheBuilder {
    cache_runtime::Cache::builder()
        .url(url)
        .key_prefix(key_prefix)
        .command_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

/// Runs an async test body on a multi-threaded runtime with a hard
/// deadline, so a hang fails fast instead of stalling CI.
pub fn run<F: Future<Output = ()>>(deadline: Duration, body: F) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        tokio::time::timeout(deadline, body)
            .await
            .unwrap_or_else(|_| panic!("test exceeded its {deadline:?} deadline"));
    });
}

/// The keys of the entries (not the version keys) under `pattern`.
pub fn entry_keys(conn: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(conn).expect("KEYS");
    keys.into_iter().filter(|k| !k.ends_with("#v") && !k.ends_with("#lock")).collect()
}

/// A private redis-server listening only on a Unix socket, stopped by pid.
pub struct UnixRedis {
    child: Child,
    dir: PathBuf,
}

impl UnixRedis {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("cache-runtime-unix-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket", socket.to_str().expect("utf-8 path"), "--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no", "--dir", dir.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        let server = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "redis-server did not open its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }
}

impl Drop for UnixRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway certificate authority and the certificates the TLS tests
/// need, made with the `openssl` binary in a private directory.
pub struct Certificates {
    pub dir: PathBuf,
}

impl Certificates {
    /// A CA named `name`, a server certificate for 127.0.0.1 and a client
    /// certificate, both signed by it.
    pub fn generate(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cache-runtime-tls-{}-{name}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl must be on PATH (apt-get install openssl)");
            assert!(status.success(), "openssl {args:?} failed");
        };
        let subject = format!("/CN={name}-ca");
        openssl(
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt"]
                .into_iter()
                .chain(["-days", "2", "-subj", &subject])
                .collect::<Vec<_>>(),
        );
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("write");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write");
        for (who, cn) in [("server", "localhost"), ("client", "cache-client")] {
            let (key, csr, crt, ext) =
                (format!("{who}.key"), format!("{who}.csr"), format!("{who}.crt"), format!("{who}.ext"));
            let subject = format!("/CN={cn}");
            openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().expect("utf-8 path").to_owned()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).expect("certificate file")
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private redis-server speaking only TLS on a free loopback port,
/// stopped by pid.
pub struct TlsRedis {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl TlsRedis {
    /// Serves `certs`' server certificate; `require_client_certificate`:
    /// mutual TLS (`tls-auth-clients yes`).
    pub fn start(certs: &Certificates, require_client_certificate: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cache-runtime-tls-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &certs.path("server.crt"), "--tls-key-file", &certs.path("server.key")])
            .args(["--tls-ca-cert-file", &certs.path("ca.crt")])
            .args(["--tls-auth-clients", if require_client_certificate { "yes" } else { "no" }])
            .args(["--save", "", "--appendonly", "no", "--dir", dir.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not open its TLS port");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Sentinel on a free loopback port, monitoring `master`
/// as `mymaster`, stopped by pid.
pub struct Sentinel {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Sentinel {
    pub const MASTER_NAME: &'static str = "mymaster";

    pub fn start(master_port: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cache-runtime-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 10000\n",
                dir.display(),
                name = Self::MASTER_NAME
            ),
        )
        .expect("write the sentinel config");
        let child = Command::new("redis-server")
            .args([config.to_str().expect("utf-8 path"), "--sentinel"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        let sentinel = Self { port, child, dir };
        sentinel.until(Duration::from_secs(10), "the sentinel to answer", |conn| {
            redis::cmd("PING").query::<String>(conn).is_ok()
        });
        sentinel
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url()).ok()?.get_connection_with_timeout(Duration::from_millis(500)).ok()
    }

    /// Polls `check` on a fresh connection until it holds.
    pub fn until(&self, within: Duration, what: &str, check: impl Fn(&mut redis::Connection) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(mut conn) = self.conn()
                && check(&mut conn)
            {
                return;
            }
            assert!(Instant::now() < deadline, "waited {within:?} for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let mut conn = self.conn()?;
        let addr: Vec<String> =
            redis::cmd("SENTINEL").arg(&["get-master-addr-by-name", Self::MASTER_NAME]).query(&mut conn).ok()?;
        addr.get(1)?.parse().ok()
    }

    /// Waits until the sentinel knows a healthy replica, then fails over.
    pub fn fail_over(&self) {
        self.until(Duration::from_secs(30), "the sentinel to know the replica", |conn| {
            let replicas: Vec<Vec<String>> =
                redis::cmd("SENTINEL").arg(&["replicas", Self::MASTER_NAME]).query(conn).unwrap_or_default();
            replicas.iter().any(|fields| {
                fields.windows(2).any(|kv| kv[0] == "flags" && kv[1] == "slave")
                    && fields.windows(2).any(|kv| kv[0] == "master-link-status" && kv[1] == "ok")
            })
        });
        let mut conn = self.conn().expect("the sentinel answers");
        let _: String =
            redis::cmd("SENTINEL").arg(&["failover", Self::MASTER_NAME]).query(&mut conn).expect("FAILOVER");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
