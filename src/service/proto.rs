//! The wire protocol between the client mode of `libcmkp11.so` and `cmkp11d`.
//!
//! Every message is one frame: a 4-byte little-endian length, then the message serialized
//! with `postcard` (serde). A frame longer than [`MAX_FRAME`] is refused by either side
//! before anything is allocated for it. The first frame of a connection is a [`Hello`],
//! answered by a [`Welcome`]; after that the client sends [`Request`]s and the daemon
//! answers each with one [`Reply`], in order.
//!
//! Values are those of the C ABI on this machine (`CK_ULONG` as `u64`, attribute values as
//! the bytes the application passed): client and daemon run on one host. Mechanism
//! parameters travel as typed values ([`Param`]), never as structures holding pointers,
//! and attribute values that would hold pointers (nested templates) are refused.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts: a 4 MiB data buffer (the CLI encrypts 1 MiB chunks)
/// plus room for the rest of a message.
pub const MAX_FRAME: usize = 4 * 1024 * 1024 + 64 * 1024;
/// Largest output the daemon produces for one call.
pub const MAX_OUTPUT: usize = 4 * 1024 * 1024;

/// First message of a connection.
#[derive(Debug, Serialize, Deserialize)]
pub enum Hello {
    /// A new client context (sessions, login state).
    Open {
        /// Lowest protocol version the client speaks.
        min: u32,
        /// Highest protocol version the client speaks.
        max: u32,
    },
    /// One more connection of an existing context (another thread of the same process).
    Attach {
        /// The protocol version agreed on the first connection.
        version: u32,
        /// The context's id.
        context: u64,
        /// The context's secret, from its [`Welcome`].
        secret: [u8; 32],
    },
}

/// The daemon's answer to a [`Hello`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Welcome {
    /// Accepted.
    Ok {
        /// The agreed version.
        version: u32,
        /// The context's id.
        context: u64,
        /// The context's secret (to attach more connections).
        secret: [u8; 32],
    },
    /// Refused, with the reason (also in the daemon's log).
    Refused(String),
}

/// One attribute of a template: type and value (`None`: a NULL `pValue`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attr {
    /// `CKA_*`.
    pub ty: u64,
    /// The value bytes.
    pub value: Option<Vec<u8>>,
}

/// A mechanism parameter (see [`crate::backend::mech::Param`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Param {
    None,
    Iv16([u8; 16]),
    Iv8([u8; 8]),
    Gcm {
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_bits: u64,
    },
    Pss {
        hash: u64,
        mgf: u64,
        salt: u64,
    },
    Oaep {
        hash: u64,
        mgf: u64,
        label: Option<Vec<u8>>,
    },
    Ecdh1 {
        kdf: u64,
        shared: Vec<u8>,
        public: Vec<u8>,
    },
    Eddsa {
        prehash: bool,
        context: Option<Vec<u8>>,
    },
}

/// A mechanism and its parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mech {
    /// `CKM_*`.
    pub ty: u64,
    /// Its parameter.
    pub param: Param,
}

impl From<crate::backend::mech::Mech> for Mech {
    fn from(m: crate::backend::mech::Mech) -> Mech {
        use crate::backend::mech::Param as P;
        let param = match m.param {
            P::None => Param::None,
            P::Iv16(v) => Param::Iv16(v),
            P::Iv8(v) => Param::Iv8(v),
            P::Gcm { iv, aad, tag_bits } => Param::Gcm {
                iv: iv.to_vec(),
                aad: aad.to_vec(),
                tag_bits,
            },
            P::Pss { hash, mgf, salt } => Param::Pss { hash, mgf, salt },
            P::Oaep { hash, mgf, label } => Param::Oaep { hash, mgf, label },
            P::Ecdh1 {
                kdf,
                shared,
                public,
            } => Param::Ecdh1 {
                kdf,
                shared,
                public,
            },
            P::Eddsa { prehash, context } => Param::Eddsa { prehash, context },
        };
        Mech { ty: m.ty, param }
    }
}

/// The operation an `*Init` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Op {
    Encrypt,
    Decrypt,
    Digest,
    Sign,
    Verify,
}

/// A data call of an active operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, strum::IntoStaticStr)]
#[allow(missing_docs)]
pub enum DataCall {
    Encrypt,
    EncryptUpdate,
    EncryptFinal,
    Decrypt,
    DecryptUpdate,
    DecryptFinal,
    Digest,
    DigestUpdate,
    DigestFinal,
    Sign,
    SignUpdate,
    SignFinal,
    Verify,
    VerifyUpdate,
    VerifyFinal,
}

impl DataCall {
    /// Whether the call returns output bytes (two-call convention).
    pub fn has_output(self) -> bool {
        use DataCall::*;
        matches!(
            self,
            Encrypt
                | EncryptUpdate
                | EncryptFinal
                | Decrypt
                | DecryptUpdate
                | DecryptFinal
                | Digest
                | DigestFinal
                | Sign
                | SignFinal
        )
    }
}

/// A PKCS#11 call, as the client forwards it.
#[derive(Debug, Serialize, Deserialize, strum::IntoStaticStr)]
#[allow(missing_docs)]
pub enum Request {
    GetInfo,
    GetSlotList {
        present: bool,
    },
    GetSlotInfo(u64),
    GetTokenInfo(u64),
    GetMechanismList(u64),
    GetMechanismInfo {
        slot: u64,
        mech: u64,
    },
    OpenSession {
        slot: u64,
        flags: u64,
    },
    CloseSession(u64),
    CloseAllSessions(u64),
    GetSessionInfo(u64),
    Login {
        session: u64,
        user: u64,
        pin: Vec<u8>,
    },
    Logout(u64),
    CreateObject {
        session: u64,
        template: Vec<Attr>,
    },
    CopyObject {
        session: u64,
        object: u64,
        template: Vec<Attr>,
    },
    DestroyObject {
        session: u64,
        object: u64,
    },
    GetObjectSize {
        session: u64,
        object: u64,
    },
    /// Types and buffer lengths (`None`: NULL `pValue`, a length query).
    GetAttributeValue {
        session: u64,
        object: u64,
        query: Vec<(u64, Option<u64>)>,
    },
    SetAttributeValue {
        session: u64,
        object: u64,
        template: Vec<Attr>,
    },
    FindObjectsInit {
        session: u64,
        template: Vec<Attr>,
    },
    FindObjects {
        session: u64,
        max: u64,
    },
    FindObjectsFinal(u64),
    /// `C_*Init`; `mech` is `None` for a NULL mechanism pointer.
    Init {
        op: Op,
        session: u64,
        mech: Option<Mech>,
        key: u64,
    },
    /// A data call: `input` (for `Verify`/`VerifyFinal` the data and `extra` the
    /// signature); the daemon returns the whole output, `hint` is the expected size.
    Data {
        call: DataCall,
        session: u64,
        input: Vec<u8>,
        extra: Vec<u8>,
        hint: u64,
    },
    DigestKey {
        session: u64,
        key: u64,
    },
    GenerateKey {
        session: u64,
        mech: Option<Mech>,
        template: Vec<Attr>,
    },
    GenerateKeyPair {
        session: u64,
        mech: Option<Mech>,
        public: Vec<Attr>,
        private: Vec<Attr>,
    },
    WrapKey {
        session: u64,
        mech: Option<Mech>,
        wrapping: u64,
        key: u64,
    },
    UnwrapKey {
        session: u64,
        mech: Option<Mech>,
        unwrapping: u64,
        blob: Vec<u8>,
        template: Vec<Attr>,
    },
    DeriveKey {
        session: u64,
        mech: Option<Mech>,
        base: u64,
        template: Vec<Attr>,
    },
    SeedRandom {
        session: u64,
        seed: Vec<u8>,
    },
    GenerateRandom {
        session: u64,
        len: u64,
    },
    /// A function of the "cmkp11 admin" vendor interface called by an application in
    /// client mode. The daemon refuses it (lifecycle changes are for operators, on the
    /// admin socket) and records the attempt: it travels only so that the refusal is
    /// the daemon's and in its audit log.
    Admin {
        session: u64,
        /// The key handle (0 for purge).
        key: u64,
        call: AdminCall,
    },
}

/// A function of the "cmkp11 admin" vendor interface ([`Request::Admin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum AdminCall {
    Rotate,
    Enable,
    Disable,
    /// Days (0: the configured window).
    ScheduleDeletion(u64),
    CancelDeletion,
    Purge,
}

/// `CK_VERSION`.
pub type Version = (u8, u8);

/// `CK_INFO`.
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Info {
    pub cryptoki: Version,
    pub manufacturer: Vec<u8>,
    pub flags: u64,
    pub description: Vec<u8>,
    pub library: Version,
}

/// `CK_SLOT_INFO`.
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SlotInfo {
    pub description: Vec<u8>,
    pub manufacturer: Vec<u8>,
    pub flags: u64,
    pub hw: Version,
    pub fw: Version,
}

/// `CK_TOKEN_INFO`.
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct TokenInfo {
    pub label: Vec<u8>,
    pub manufacturer: Vec<u8>,
    pub model: Vec<u8>,
    pub serial: Vec<u8>,
    pub flags: u64,
    /// The ten `CK_ULONG` counters, in the structure's order.
    pub counts: [u64; 10],
    pub hw: Version,
    pub fw: Version,
    pub time: Vec<u8>,
}

/// The daemon's answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Reply {
    /// A plain result: `CKR_OK` for calls without output, else the error.
    Rv(u64),
    Handle(u64),
    Handles(Vec<u64>),
    Pair(u64, u64),
    Bytes(Vec<u8>),
    Ulong(u64),
    Ulongs(Vec<u64>),
    Info(Info),
    SlotInfo(SlotInfo),
    TokenInfo(TokenInfo),
    SessionInfo {
        slot: u64,
        state: u64,
        flags: u64,
        device_error: u64,
    },
    MechanismInfo {
        min: u64,
        max: u64,
        flags: u64,
    },
    /// `C_GetAttributeValue`: the call's code and, per attribute, `ulValueLen` and the
    /// value when a buffer was given and filled.
    Attributes {
        rv: u64,
        values: Vec<(u64, Option<Vec<u8>>)>,
    },
}

impl Request {
    /// The PKCS#11 function this request stands for, without the `C_` (`EncryptInit`,
    /// `Encrypt`, `GenerateKey`, ...): the daemon's metrics label calls by it.
    pub fn call_name(&self) -> &'static str {
        match self {
            Request::Init { op, .. } => match op {
                Op::Encrypt => "EncryptInit",
                Op::Decrypt => "DecryptInit",
                Op::Digest => "DigestInit",
                Op::Sign => "SignInit",
                Op::Verify => "VerifyInit",
            },
            Request::Data { call, .. } => call.into(),
            other => other.into(),
        }
    }
}

impl Reply {
    /// The call's `CK_RV` as the application will see it (`CKR_OK` for a value).
    pub fn result_code(&self) -> u64 {
        match self {
            Reply::Rv(rv) | Reply::Attributes { rv, .. } => *rv,
            _ => 0,
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// An I/O error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame over [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// A frame that does not decode.
    #[error("undecodable message: {0}")]
    Garbage(postcard::Error),
}

/// How long a side that waits for the other's next message polls before it sleeps.
///
/// A message between processes on different CPUs that finds its reader asleep costs a
/// wake-up (an inter-processor interrupt, ~30 µs in a VM); a reader that polls briefly,
/// yielding its CPU between polls, picks it up at once, and yields to the writer when both
/// run on one CPU.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(60);

/// Waits up to [`SPIN`] for `fd` to become readable, polling and yielding (then the
/// caller's blocking read sleeps as usual).
pub fn spin_until_readable(fd: &impl std::os::fd::AsFd) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let start = std::time::Instant::now();
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        if poll(&mut fds, Some(&zero)).unwrap_or(1) > 0 || start.elapsed() >= SPIN {
            return;
        }
        std::thread::yield_now();
    }
}

/// Serializes `msg` into one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = vec![0u8; 4];
    let mut buf = postcard::to_extend(msg, std::mem::take(&mut buf))
        .expect("postcard serialization into a Vec cannot fail");
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf
}

/// Writes one message.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let frame = encode(msg);
    if frame.len() > MAX_FRAME + 4 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "message exceeds the protocol's size limit",
        ));
    }
    w.write_all(&frame)
}

/// Reads one frame's body (the length is checked before the body is allocated).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            e.into()
        }
    })
}

/// Reads and decodes one message.
pub fn recv<T: serde::de::DeserializeOwned>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<T, FrameError> {
    read_frame(r, buf)?;
    postcard::from_bytes(buf).map_err(FrameError::Garbage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let req = Request::Data {
            call: DataCall::Encrypt,
            session: 7,
            input: vec![1, 2, 3],
            extra: vec![],
            hint: 19,
        };
        let frame = encode(&req);
        let mut buf = Vec::new();
        let back: Request = recv(&mut &frame[..], &mut buf).unwrap();
        assert!(matches!(
            back,
            Request::Data {
                session: 7,
                hint: 19,
                ..
            }
        ));
        // A length over the limit is refused before reading the body.
        let mut big = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        assert!(matches!(
            recv::<Request>(&mut &big[..], &mut buf),
            Err(FrameError::TooLong(_))
        ));
        // Garbage is an error, not a panic.
        let junk = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(
            recv::<Request>(&mut &junk[..], &mut buf),
            Err(FrameError::Garbage(_))
        ));
        // A truncated frame is a closed connection.
        assert!(matches!(
            recv::<Request>(&mut &frame[..frame.len() - 1], &mut buf),
            Err(FrameError::Closed)
        ));
    }
}
