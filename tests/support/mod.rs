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

/// A loopback port nothing listens on, and that this process has not been
/// given before: a port is free again as soon as its probe closes, so two
/// calls in a row (a cluster node's port and its bus port) could otherwise
/// get the same one.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("no free loopback port");
        let port = listener.local_addr().expect("listener has an address").port();
        let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The programs the harness runs: why, and the Debian/Ubuntu package that
/// provides each.
const TOOLS: &[(&str, &str, &str)] = &[
    ("redis-server", "redis-server", "the tests start private Redis servers, Sentinels and clusters with it"),
    ("redis-cli", "redis-tools", "the cluster tests join their nodes with `redis-cli --cluster create`"),
    ("openssl", "openssl", "the TLS tests make their certificates with it"),
];

/// `program`, once it is known to be on `PATH`: a newcomer without it gets
/// the package to install instead of a bare "No such file or directory"
/// from a spawn deep inside a test.
fn tool(program: &'static str) -> &'static str {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    if !on_path {
        let (why, package) = TOOLS
            .iter()
            .find(|(name, ..)| *name == program)
            .map_or(("the tests need it", program), |(_, package, why)| (*why, *package));
        panic!(
            "`{program}` is not on PATH: {why}. Install it (Debian/Ubuntu: `apt-get install {package}`; \
             macOS: `brew install {}`) and run the tests again.",
            if program == "openssl" { "openssl" } else { "redis" }
        );
    }
    program
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
        let child = Command::new(tool("redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
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

    /// `INFO commandstats` as command name → calls since the last
    /// `CONFIG RESETSTAT` (Redis 7.0 counts scripts' inner calls too).
    pub fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut self.conn()).expect("INFO commandstats");
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                Some((name.to_owned(), rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// A connection, unless the server is down.
    pub fn try_conn(&self) -> Option<redis::Connection> {
        self.child.as_ref()?;
        redis::Client::open(self.url()).ok()?.get_connection_with_timeout(Duration::from_millis(500)).ok()
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

/// A cache builder for a private deployment with generous deadlines: tests
/// that count computations must not see a slow CI machine turn a hit into a
/// fall-through. `url` is a [`Topology::url`]: one server's URL, or a
/// cluster's node URLs joined by commas.
pub fn patient_cache(url: &str, key_prefix: &str) -> cache_runtime::CacheBuilder {
    let builder = cache_runtime::Cache::builder();
    #[cfg(feature = "cluster")]
    let builder = if url.contains(',') { builder.cluster(url.split(',')) } else { builder.url(url) };
    #[cfg(not(feature = "cluster"))]
    let builder = builder.url(url);
    builder.key_prefix(key_prefix).command_timeout(Duration::from_secs(2)).connect_timeout(Duration::from_secs(2))
}

/// Where a test's cache lives: one private server, or (feature `cluster`)
/// a private three-master Redis Cluster. Core behaviour tests take a
/// `&Topology` and are run on each by [`on_every_topology!`].
pub enum Topology {
    Server(RedisServer),
    #[cfg(feature = "cluster")]
    Cluster(RedisCluster),
}

impl Topology {
    pub fn server() -> Self {
        Topology::Server(RedisServer::start())
    }

    #[cfg(feature = "cluster")]
    pub fn cluster() -> Self {
        Topology::Cluster(RedisCluster::start(3))
    }

    /// What [`patient_cache`] and helper processes take.
    pub fn url(&self) -> String {
        match self {
            Topology::Server(server) => server.url(),
            #[cfg(feature = "cluster")]
            Topology::Cluster(cluster) => cluster.urls().join(","),
        }
    }

    /// A synchronous connection for inspecting Redis: on a cluster, commands
    /// go to the node owning their key, and `KEYS` to every master.
    pub fn conn(&self) -> Inspector {
        match self {
            Topology::Server(server) => Inspector::Server(server.conn()),
            #[cfg(feature = "cluster")]
            Topology::Cluster(cluster) => Inspector::Cluster(Box::new(cluster.conn())),
        }
    }

    /// An async connection, for test bodies that count in Redis.
    pub async fn async_conn(url: &str) -> AsyncConn {
        #[cfg(feature = "cluster")]
        if url.contains(',') {
            let client = redis::cluster::ClusterClient::new(url.split(',')).expect("cluster urls");
            return AsyncConn::Cluster(client.get_async_connection().await.expect("cluster answers"));
        }
        let client = redis::Client::open(url).expect("valid url");
        AsyncConn::Server(client.get_multiplexed_async_connection().await.expect("server answers"))
    }
}

/// Defines each named test function (taking `&Topology`) once per
/// topology: `server::<name>` on a private server and, with the `cluster`
/// feature, `cluster::<name>` on a private cluster. The same function runs
/// on both, so the suites cannot drift apart.
#[macro_export]
macro_rules! on_every_topology {
    ($($name:ident),+ $(,)?) => {
        mod server {
            $(#[test]
            fn $name() {
                super::$name(&super::support::Topology::server());
            })+
        }
        #[cfg(feature = "cluster")]
        mod cluster {
            $(#[test]
            fn $name() {
                super::$name(&super::support::Topology::cluster());
            })+
        }
    };
}

/// A synchronous inspection connection of a [`Topology`].
pub enum Inspector {
    Server(redis::Connection),
    #[cfg(feature = "cluster")]
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Inspector {
    fn inner(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            Inspector::Server(conn) => conn,
            #[cfg(feature = "cluster")]
            Inspector::Cluster(conn) => conn.as_mut(),
        }
    }

    fn inner_ref(&self) -> &dyn redis::ConnectionLike {
        match self {
            Inspector::Server(conn) => conn,
            #[cfg(feature = "cluster")]
            Inspector::Cluster(conn) => conn.as_ref(),
        }
    }
}

impl redis::ConnectionLike for Inspector {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        self.inner().req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        self.inner().req_packed_commands(cmd, offset, count)
    }

    // A cluster routes by the parsed command, not its bytes.
    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        self.inner().req_command(cmd)
    }

    fn get_db(&self) -> i64 {
        self.inner_ref().get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.inner().check_connection()
    }

    fn is_open(&self) -> bool {
        self.inner_ref().is_open()
    }
}

/// An async connection of a [`Topology`].
#[derive(Clone)]
pub enum AsyncConn {
    Server(redis::aio::MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl AsyncConn {
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.clone() {
            AsyncConn::Server(mut conn) => cmd.query_async(&mut conn).await,
            #[cfg(feature = "cluster")]
            AsyncConn::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }
}

/// Joins the nodes on `ports` into a cluster with `redis-cli --cluster
/// create` (`cli_args`: how redis-cli reaches them, e.g. TLS), and waits
/// until every node sees it as ok.
#[cfg(feature = "cluster")]
fn join_cluster(ports: &[u16], replicas: usize, cli_args: &[&str]) {
    let cli = |args: &[String]| {
        Command::new(tool("redis-cli")).args(cli_args).args(args).stdin(Stdio::null()).output().expect("run redis-cli")
    };
    let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
    create.extend(ports.iter().map(|port| format!("127.0.0.1:{port}")));
    create.extend(["--cluster-replicas".into(), replicas.to_string(), "--cluster-yes".into()]);
    let output = cli(&create);
    assert!(output.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&output.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ports.iter().all(|port| {
        let info = cli(&["-p".into(), port.to_string(), "CLUSTER".into(), "INFO".into()]);
        String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok")
    }) {
        assert!(Instant::now() < deadline, "the cluster never became ok");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster of private masters on free loopback ports (and free
/// cluster-bus ports), joined with `redis-cli --cluster create`; each node
/// is a [`RedisServer`], stopped by its pid.
#[cfg(feature = "cluster")]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

#[cfg(feature = "cluster")]
impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        Self::start_with_replicas(masters, 0)
    }

    /// `masters` masters, each with `replicas` replicas, once every replica
    /// has synced with its master. With replicas, nodes declare a silent
    /// master failed after 2 s (5 s without: nothing could replace it), so
    /// a killed master is replaced within seconds.
    pub fn start_with_replicas(masters: usize, replicas: usize) -> Self {
        let node_timeout = if replicas > 0 { "2000" } else { "5000" };
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                let bus_port = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus_port,
                    "--cluster-node-timeout",
                    node_timeout,
                ])
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(RedisServer::port).collect();
        join_cluster(&ports, replicas, &[]);
        let cluster = Self { nodes };
        cluster.wait_until("every replica has synced", |conn| {
            redis::cmd("INFO")
                .arg("replication")
                .query::<String>(conn)
                .is_ok_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
        });
        cluster
    }

    /// The replica of the master listening on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|node| {
                redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut node.conn())
                    .is_ok_and(|info| info.contains(&format!("master_port:{master_port}\r")))
            })
            .expect("the master has a replica")
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// A synchronous cluster connection.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster urls")
            .get_connection()
            .expect("cluster answers")
    }

    /// Polls `check` on every node until it holds on all of them.
    pub fn wait_until(&self, what: &str, check: impl Fn(&mut redis::Connection) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.nodes.iter().all(|node| check(&mut node.conn())) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node serving `key`'s slot now (the one that answers for it
    /// rather than redirecting), and the slot.
    pub fn owner_of(&self, key: &str) -> (&RedisServer, u16) {
        let owner = self.try_owner_of(key).expect("some node serves every slot");
        let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut owner.conn()).expect("KEYSLOT");
        (owner, slot)
    }

    /// The live node serving `key`'s slot, if one does: none while a killed
    /// master has not been replaced.
    pub fn try_owner_of(&self, key: &str) -> Option<&RedisServer> {
        self.nodes.iter().find(|node| {
            node.try_conn().is_some_and(|mut conn| redis::cmd("EXISTS").arg(key).query::<i64>(&mut conn).is_ok())
        })
    }

    /// SIGKILL, by pid, of the node listening on `port`.
    pub fn kill_node(&mut self, port: u16) {
        self.nodes.iter_mut().find(|node| node.port() == port).expect("a node on that port").kill();
    }
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

/// The keys of the entries under `pattern`: not the version keys, the
/// locks, nor the tombstones `forget` leaves.
pub fn entry_keys(conn: &mut dyn redis::ConnectionLike, pattern: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(conn).expect("KEYS");
    keys.into_iter()
        .filter(|k| !k.ends_with("#v") && !k.ends_with("#lock"))
        .filter(|k| {
            let value: Option<Vec<u8>> = redis::cmd("GET").arg(k).query(conn).unwrap_or(None);
            !value.is_some_and(|v| v.starts_with(b"RC2|-|"))
        })
        .collect()
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
        let child = Command::new(tool("redis-server"))
            .args(["--port", "0", "--unixsocket", socket.to_str().expect("utf-8 path"), "--unixsocketperm", "700"])
            .args(["--save", "", "--appendonly", "no", "--dir", dir.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
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
            let status = Command::new(tool("openssl"))
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run openssl");
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
        Self::start_with(certs, require_client_certificate, &[])
    }

    /// As [`start`](Self::start), with extra `redis-server` arguments.
    pub fn start_with(certs: &Certificates, require_client_certificate: bool, extra_args: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cache-runtime-tls-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let child = Command::new(tool("redis-server"))
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--tls-cert-file", &certs.path("server.crt"), "--tls-key-file", &certs.path("server.key")])
            .args(["--tls-ca-cert-file", &certs.path("ca.crt")])
            .args(["--tls-auth-clients", if require_client_certificate { "yes" } else { "no" }])
            .args(["--save", "", "--appendonly", "no", "--dir", dir.to_str().expect("utf-8 path")])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
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

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A Redis Cluster whose nodes speak only TLS, to clients and to each other
/// (`tls-cluster yes`), with `certs`' server certificate.
#[cfg(all(feature = "cluster", feature = "tls"))]
pub struct TlsRedisCluster {
    nodes: Vec<TlsRedis>,
}

#[cfg(all(feature = "cluster", feature = "tls"))]
impl TlsRedisCluster {
    pub fn start(certs: &Certificates, masters: usize) -> Self {
        let nodes: Vec<TlsRedis> = (0..masters)
            .map(|_| {
                let bus_port = free_port().to_string();
                TlsRedis::start_with(
                    certs,
                    false,
                    &["--tls-cluster", "yes", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                        .into_iter()
                        .chain(["--cluster-port", &bus_port])
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(TlsRedis::port).collect();
        join_cluster(&ports, 0, &["--tls", "--cacert", &certs.path("ca.crt")]);
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(TlsRedis::url).collect()
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
        let child = Command::new(tool("redis-server"))
            .args([config.to_str().expect("utf-8 path"), "--sentinel"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
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
