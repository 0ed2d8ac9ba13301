//! `p11-kit server` for the remote-token suites (`remote_token.rs`, `fleet.rs`): SoftHSM2
//! served on a unix socket in a temporary directory, with `P11_KIT_DEBUG=rpc` so that the
//! calls it serves can be counted; killed and waited for on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// SoftHSM2's module, which the server serves.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// p11-kit's client module, where Debian puts it; `None` (with a note) when p11-kit or
/// its client module is not installed.
pub fn client_module() -> Option<PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
        "/usr/lib64/pkcs11/p11-kit-client.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let have_server = Command::new("p11-kit").arg("--help").output().is_ok();
    if found.is_none() || !have_server {
        eprintln!(
            "note: p11-kit or p11-kit-client.so not installed (scripts/setup.sh installs \
             p11-kit and p11-kit-modules); skipped"
        );
        return None;
    }
    found
}

/// A running `p11-kit server`.
pub struct Server {
    child: Child,
    /// Its stderr (the RPC debug lines).
    pub log: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Serves the token labelled `token` of the SoftHSM2 configured by `softhsm_conf`,
    /// on a socket in `dir`.
    pub fn start(dir: &Path, softhsm_conf: &Path, token: &str) -> Server {
        let socket = dir.join("p11kit.sock");
        let log = dir.join("p11kit-server.log");
        let child = Command::new("p11-kit")
            .args(["server", "-f", "-n"])
            .arg(&socket)
            .args(["--provider", SOFTHSM, &format!("pkcs11:token={token}")])
            .env("SOFTHSM2_CONF", softhsm_conf)
            .env("P11_KIT_DEBUG", "rpc")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start p11-kit server");
        let server = Server { child, log, socket };
        let start = Instant::now();
        while !server.socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "p11-kit server did not open its socket: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// The `P11_KIT_SERVER_ADDRESS` of this server.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    /// Calls the server has answered so far (one line per call with `P11_KIT_DEBUG=rpc`).
    pub fn calls(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(": ret: "))
            .count()
    }

    /// The round trips `f` made.
    pub fn count<T>(&self, f: impl FnOnce() -> T) -> (T, usize) {
        let before = self.calls();
        let r = f();
        (r, self.calls() - before)
    }
}
