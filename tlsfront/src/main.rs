//! tensorguard-tlsfront: the control plane's TLS front end. It terminates the robots' (mutual) TLS on
//! rustls and hands each connection, in plaintext behind a PROXY v2 header that names the robot's
//! address and verified certificate, to one of the API's workers over a private Unix socket.
//!
//! Why: on Debian 12, OpenSSL 3.0's server side of one mutual-TLS 1.3 handshake costs ~0.6 ms of CPU
//! (rustls: ~0.1 ms), and the per-robot handshake was 60-80 % of the CA's CPU per renewal. It is started
//! by `tensorguard server serve`, which binds the TCP socket (passed as --listen-fd) and the workers'
//! Unix sockets; it never parses HTTP.

mod client_auth;
mod proxy_header;
mod relay;
mod validity;

use std::fs::File;
use std::io::BufReader;
use std::net::TcpListener as StdTcpListener;
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::{Certificate, PrivateKey, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::client_auth::FleetIssuer;

const USAGE: &str = "\
usage: tensorguard-tlsfront --listen-fd FD --upstream PATH [--upstream PATH ...] --cert PEM --key PEM
                            --client-ca PEM [--threads N] [--handshake-timeout SECS] [--idle-timeout SECS]

Terminates TLS 1.2/1.3 for the TensorGuard control plane on rustls and forwards each connection to the
API's Unix sockets (round robin), prefixed with a PROXY protocol v2 header: the client's address, the
TLS version, and in TLV 0xE0 the DER of the client certificate if one was presented. A client
certificate is optional; when presented it must be signed by --client-ca (the only trust anchor; other
certificates the client sends are ignored) and allow clientAuth. Its dates are not checked here: the
API answers an expired certificate itself. A worker's connection is opened when the client's first
bytes arrive, so a client that stays idle costs the workers nothing.

  --listen-fd FD            an inherited, listening TCP socket
  --upstream PATH           a worker's Unix socket (repeat for each worker)
  --cert PEM                the server's certificate chain (leaf first)
  --key PEM                 its private key (PKCS#8, SEC1 or PKCS#1)
  --client-ca PEM           the issuer of client certificates
  --threads N               worker threads (default 1)
  --handshake-timeout SECS  drop a client that has not finished its handshake by then (default 10)
  --idle-timeout SECS       close a connection on which no byte has moved for that long, before its
                            first request or between requests, on either leg (default 30)

Started by `tensorguard server serve`; exits 0 on SIGTERM/SIGINT, 2 on a bad command line, 1 if its
files cannot be used.";

struct Options {
    listen_fd: i32,
    upstreams: Vec<PathBuf>,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    threads: usize,
    timeouts: Timeouts,
}

/// How long a connection may take to finish its handshake, and stay silent afterwards.
#[derive(Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    idle: Duration,
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value.parse::<u64>().ok().filter(|s| (1..=300).contains(s)).map(Duration::from_secs)
        .ok_or_else(|| format!("{flag} must be 1..300 seconds, not {value:?}"))
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let (mut listen_fd, mut cert, mut key, mut client_ca) = (None, None, None, None);
    let mut upstreams = Vec::new();
    let mut threads = 1usize;
    let mut timeouts = Timeouts { handshake: Duration::from_secs(10), idle: Duration::from_secs(30) };
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen-fd" => listen_fd = Some(value.parse::<i32>().ok().filter(|fd| *fd >= 0)
                .ok_or_else(|| format!("--listen-fd must be a file descriptor number, not {value:?}"))?),
            "--upstream" => upstreams.push(PathBuf::from(value)),
            "--cert" => cert = Some(PathBuf::from(value)),
            "--key" => key = Some(PathBuf::from(value)),
            "--client-ca" => client_ca = Some(PathBuf::from(value)),
            "--threads" => threads = value.parse::<usize>().ok().filter(|n| (1..=64).contains(n))
                .ok_or_else(|| format!("--threads must be 1..64, not {value:?}"))?,
            "--handshake-timeout" => timeouts.handshake = seconds(&flag, &value)?,
            "--idle-timeout" => timeouts.idle = seconds(&flag, &value)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let missing = |name: &str| format!("{name} is required");
    if upstreams.is_empty() {
        return Err(missing("--upstream"));
    }
    Ok(Options {
        listen_fd: listen_fd.ok_or_else(|| missing("--listen-fd"))?,
        upstreams,
        cert: cert.ok_or_else(|| missing("--cert"))?,
        key: key.ok_or_else(|| missing("--key"))?,
        client_ca: client_ca.ok_or_else(|| missing("--client-ca"))?,
        threads,
        timeouts,
    })
}

fn read_pem(path: &PathBuf) -> Result<Vec<rustls_pemfile::Item>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::read_all(&mut BufReader::new(file)).map_err(|e| format!("{}: not PEM: {e}", path.display()))
}

fn certificates(path: &PathBuf) -> Result<Vec<Certificate>, String> {
    let certs: Vec<Certificate> = read_pem(path)?.into_iter()
        .filter_map(|item| match item { rustls_pemfile::Item::X509Certificate(der) => Some(Certificate(der)), _ => None })
        .collect();
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

fn private_key(path: &PathBuf) -> Result<PrivateKey, String> {
    read_pem(path)?.into_iter()
        .find_map(|item| match item {
            rustls_pemfile::Item::PKCS8Key(der) | rustls_pemfile::Item::ECKey(der) | rustls_pemfile::Item::RSAKey(der) =>
                Some(PrivateKey(der)),
            _ => None,
        })
        .ok_or_else(|| format!("{}: no private key block", path.display()))
}

fn server_config(options: &Options) -> Result<ServerConfig, String> {
    let verifier = FleetIssuer::new(&certificates(&options.client_ca)?)
        .map_err(|e| format!("{}: {e}", options.client_ca.display()))?;
    let mut config = ServerConfig::builder()
        .with_safe_defaults()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certificates(&options.cert)?, private_key(&options.key)?)
        .map_err(|e| format!("{} / {}: {e}", options.cert.display(), options.key.display()))?;
    // A resumed session would carry the certificate of the handshake that made it, which a robot has
    // replaced since (see tlsproto.py): no tickets, no session cache.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_half_rtt_data = false;
    Ok(config)
}

/// Counts of what went wrong, printed once a minute at most instead of a line per bad client.
#[derive(Default)]
struct Failures {
    handshake: AtomicU64,
    idle: AtomicU64,
    upstream: AtomicU64,
}

impl Failures {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Bytes read past the PROXY header for the client's first request (more follows through the relay).
const FIRST_READ: usize = 4096;

async fn serve_one(stream: TcpStream, acceptor: TlsAcceptor, upstream: PathBuf, timeouts: Timeouts,
                   failures: Arc<Failures>) {
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => (peer, local),
        _ => return,
    };
    let _ = stream.set_nodelay(true);
    let mut tls = match timeout(timeouts.handshake, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        _ => return Failures::count(&failures.handshake),
    };
    let (_, connection) = tls.get_ref();
    let version = match connection.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    let client_cert = connection.peer_certificates().and_then(|certs| certs.first()).map(|c| c.0.clone());
    let mut opening = proxy_header::encode(peer, local, version, client_cert.as_deref());
    opening.reserve(FIRST_READ);
    match timeout(timeouts.idle, tls.read_buf(&mut opening)).await {
        Ok(Ok(read)) if read > 0 => {}
        Ok(_) => return, // closed before its first request
        Err(_) => return Failures::count(&failures.idle),
    }
    let mut api = match timeout(timeouts.handshake, UnixStream::connect(&upstream)).await {
        Ok(Ok(api)) => api,
        _ => return Failures::count(&failures.upstream),
    };
    if !matches!(timeout(timeouts.idle, api.write_all(&opening)).await, Ok(Ok(()))) {
        return Failures::count(&failures.upstream);
    }
    drop(opening);
    if relay::until_idle(&mut tls, &mut api, timeouts.idle).await == relay::Ended::Idle {
        Failures::count(&failures.idle);
    }
}

async fn run(options: Options, config: ServerConfig) -> Result<(), String> {
    // SAFETY: the fd was handed over by the parent for this process to own; nothing else here uses it.
    let std_listener = unsafe { StdTcpListener::from_raw_fd(options.listen_fd) };
    std_listener.set_nonblocking(true).map_err(|e| format!("--listen-fd {}: {e}", options.listen_fd))?;
    let listener = TcpListener::from_std(std_listener).map_err(|e| format!("--listen-fd {}: {e}", options.listen_fd))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let failures = Arc::new(Failures::default());
    let next = AtomicUsize::new(0);
    let report = Arc::clone(&failures);
    tokio::spawn(async move {
        let mut last = (0, 0, 0);
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            let now = (report.handshake.load(Ordering::Relaxed), report.idle.load(Ordering::Relaxed),
                       report.upstream.load(Ordering::Relaxed));
            if now != last {
                eprintln!("tensorguard-tlsfront: {} failed or timed-out handshakes, {} connections closed idle, {} \
                           connections the API did not take (since start)", now.0, now.1, now.2);
                last = now;
            }
        }
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // EMFILE and the like: back off instead of spinning, then take the next one
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let index = next.fetch_add(1, Ordering::Relaxed) % options.upstreams.len();
                tokio::spawn(serve_one(stream, acceptor.clone(), options.upstreams[index].clone(),
                                       options.timeouts, Arc::clone(&failures)));
            }
            _ = terminate.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Exit with `serve` (SIGTERM when the process that started us dies, even by SIGKILL), so that an
/// orphaned front never keeps the port or the CA's key open. False if that process is gone already.
/// Under a seccomp filter without prctl the request fails; the unit's KillMode= covers that case.
fn follow_parent() -> bool {
    let parent = std::os::unix::process::parent_id();
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    let _ = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) };
    std::os::unix::process::parent_id() == parent && parent != 1
}

/// Raise the soft limit on open files to the hard one (systemd's default soft limit is 1024): every
/// robot in flight holds two descriptors here, its TCP connection and its worker's Unix socket.
fn raise_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the one rlimit struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    raise_file_limit();
    if !follow_parent() {
        eprintln!("tensorguard-tlsfront: started by no process or by one that has exited already; `tensorguard \
                   server serve` starts it");
        return ExitCode::from(1);
    }
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("tensorguard-tlsfront: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match server_config(&options) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("tensorguard-tlsfront: {message}");
            return ExitCode::from(1);
        }
    };
    // One thread: the current-thread scheduler, without the work-stealing machinery one thread cannot use.
    let mut builder = if options.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut multi = tokio::runtime::Builder::new_multi_thread();
        multi.worker_threads(options.threads);
        multi
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tensorguard-tlsfront: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(options, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tensorguard-tlsfront: {message}");
            ExitCode::from(1)
        }
    }
}
