//! The identity a call is made for, in the daemon: the kernel-attested peer of the
//! connection the call came from.
//!
//! In library mode nothing here is set, and the runtime and the audit log use the
//! process's own identity (one relaxed atomic load, a predictable branch). `cmkp11d` sets
//! the peer of each connection on the thread that serves it, before it calls into the
//! runtime, so that the access rules and every audit record name the application's uid,
//! pid and executable as the kernel reported them, never anything the client sent.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A connected application, as the kernel describes it.
#[derive(Debug)]
pub struct Peer {
    /// Process id (`SO_PEERCRED`).
    pub pid: u32,
    /// Real user id (`SO_PEERCRED`).
    pub uid: u32,
    /// Group id (`SO_PEERCRED`).
    pub gid: u32,
    /// The executable (`/proc/PID/exe`).
    pub exe: PathBuf,
    /// The executable as a JSON string, escaped once for audit records.
    pub exe_json: String,
    /// Whether the peer came through the operators' admin socket (and was authorized
    /// there). Applications never are: the runtime refuses them every lifecycle change
    /// ([`is_application`]).
    pub operator: bool,
}

/// Whether this thread serves an application of `cmkp11d` (not an operator of its admin
/// socket, not the daemon itself, not library mode): such a caller may use keys but never
/// change a CMK's lifecycle.
pub fn is_application() -> bool {
    current().is_some_and(|p| !p.operator)
}

/// The supplementary groups of a connected peer, as the kernel recorded them when it
/// connected (`SO_PEERGROUPS`, Linux 4.13+).
pub fn peer_groups(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes; the kernel writes at most
        // `len` bytes and sets `len` to what it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65_536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// The gid of a group name in the group database (`getgrnam_r`), if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: a zeroed `group` is a valid out-parameter (plain C struct of pointers
        // and integers).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `cname` is NUL-terminated; `grp`, `buf` (of `buf.len()` bytes) and `out`
        // are valid for writes during the call.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (rc == 0 && !out.is_null()).then_some(grp.gr_gid);
    }
}

/// Set once when a process starts serving peers (the daemon); never in library mode.
static HOSTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CURRENT: RefCell<Option<Arc<Peer>>> = const { RefCell::new(None) };
}

/// Runs `f` with `peer` as the identity of every call the runtime makes on this thread.
pub fn serve_as<R>(peer: &Arc<Peer>, f: impl FnOnce() -> R) -> R {
    HOSTING.store(true, Ordering::Relaxed);
    let old = CURRENT.with(|c| c.replace(Some(peer.clone())));
    let r = f();
    CURRENT.with(|c| *c.borrow_mut() = old);
    r
}

/// The peer this thread serves, if any.
#[inline]
pub fn current() -> Option<Arc<Peer>> {
    if !HOSTING.load(Ordering::Relaxed) {
        return None;
    }
    CURRENT.with(|c| c.borrow().clone())
}
