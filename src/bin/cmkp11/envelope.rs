//! `cmkp11 encrypt` / `cmkp11 decrypt`: envelope encryption of files under a wrap CMK.
//!
//! # File format (version 1)
//! ```text
//! header:
//!   magic        8   "CMKP11FE"
//!   version      1   1
//!   algorithm    1   1 = DEK wrapped with AES-KWP (RFC 5649), chunks AES-GCM, 128-bit tags
//!   chunk size   4   plaintext bytes per chunk, big endian
//!   nonce prefix 4   random
//!   name         2+n the CMK's name (length big endian, UTF-8)
//!   id           2+n the CMK's stable id
//!   wrapped DEK  2+n the data key wrapped by the CMK's primary version
//! chunks, each: AES-GCM(ciphertext || 16-byte tag) of `chunk size` plaintext bytes, the
//! last one shorter (possibly empty: a file always has at least one chunk)
//!   IV  = nonce prefix || chunk index (8 bytes, big endian)
//!   AAD = SHA-256(header) || chunk index (8 bytes, big endian) || last-chunk flag (1 byte)
//! ```
//! The header hash in every chunk's AAD binds the header (key, wrapped DEK, chunk size);
//! the index detects reordered or dropped chunks; the last-chunk flag detects a file cut at
//! a chunk boundary; bytes after the last chunk are part of it and fail its tag.
//!
//! The DEK is generated in the token as a session key (AES-256, or AES-128 under a 128-bit
//! CMK: a DEK is never stronger than its wrapping key) and never leaves it unwrapped; the
//! chunks are encrypted and decrypted inside the token. Memory use is a few chunks
//! whatever the file size. Output goes to an unnamed temporary file in the destination
//! directory (`O_TMPFILE`), linked into place only when everything succeeded: a killed
//! command leaves nothing behind.

use crate::ctx::{describe, Ctx};
use crate::keyinfo::key_info;
use crate::progress::Progress;
use crate::{fail, output, CliError, Global, R};
use clap::Args;
use cmkp11::backend::mech::{Mech, Param};
use cmkp11::backend::probe::Capability;
use cmkp11::keystore::{self, Cmk, State};
use cmkp11::runtime::session::{Delivery, Kind, Session};
use cmkp11::runtime::Library;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki_sys::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// First bytes of every encrypted file.
pub const MAGIC: &[u8; 8] = b"CMKP11FE";
/// The format version this command writes.
pub const VERSION: u8 = 1;
/// DEK wrapped with AES-KWP, chunks AES-GCM with 128-bit tags.
pub const ALG_KWP_GCM: u8 = 1;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 1 << 20;
const MIN_CHUNK: u32 = 4096;
const MAX_CHUNK: u32 = 64 << 20;
const TAG: usize = 16;
const MAX_FIELD: usize = 1024;

/// `cmkp11 encrypt`.
#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// The wrap CMK that protects the file's data key.
    #[arg(long, value_name = "NAME")]
    key: String,
    /// The file to encrypt.
    input: PathBuf,
    /// Where to write the encrypted file.
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Plaintext bytes per chunk (4096..=67108864).
    #[arg(long, default_value_t = DEFAULT_CHUNK, value_parser = clap::value_parser!(u32).range(i64::from(MIN_CHUNK)..=i64::from(MAX_CHUNK)), hide_short_help = true)]
    chunk_size: u32,
}

/// `cmkp11 decrypt`.
#[derive(Args, Debug)]
pub struct DecryptArgs {
    /// The encrypted file.
    input: PathBuf,
    /// Where to write the decrypted file.
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// The parsed header of an encrypted file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    chunk_size: u32,
    prefix: [u8; 4],
    name: String,
    id: Vec<u8>,
    wrapped: Vec<u8>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(64 + self.name.len() + self.id.len() + self.wrapped.len());
        h.extend_from_slice(MAGIC);
        h.push(VERSION);
        h.push(ALG_KWP_GCM);
        h.extend_from_slice(&self.chunk_size.to_be_bytes());
        h.extend_from_slice(&self.prefix);
        for f in [self.name.as_bytes(), &self.id, &self.wrapped] {
            h.extend_from_slice(&(f.len() as u16).to_be_bytes());
            h.extend_from_slice(f);
        }
        h
    }

    /// Reads a header; returns it with its exact bytes.
    fn read(r: &mut impl Read, path: &Path) -> R<(Header, Vec<u8>)> {
        let not_ours = || {
            CliError::new(format!(
                "{} is not a file made by `cmkp11 encrypt` (or its header is damaged)",
                path.display()
            ))
        };
        let mut raw = vec![0u8; 18];
        r.read_exact(&mut raw).map_err(|_| not_ours())?;
        if &raw[..8] != MAGIC {
            return Err(not_ours());
        }
        if raw[8] != VERSION || raw[9] != ALG_KWP_GCM {
            return fail(format!(
                "{} uses format version {} (algorithm {}), which this cmkp11 does not read; \
                 decrypt it with a newer cmkp11",
                path.display(),
                raw[8],
                raw[9]
            ));
        }
        let chunk_size = u32::from_be_bytes(raw[10..14].try_into().unwrap_or_default());
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(not_ours());
        }
        let prefix: [u8; 4] = raw[14..18].try_into().unwrap_or_default();
        let mut fields = Vec::new();
        for _ in 0..3 {
            let mut len = [0u8; 2];
            r.read_exact(&mut len).map_err(|_| not_ours())?;
            let n = usize::from(u16::from_be_bytes(len));
            if n > MAX_FIELD {
                return Err(not_ours());
            }
            let mut f = vec![0u8; n];
            r.read_exact(&mut f).map_err(|_| not_ours())?;
            raw.extend_from_slice(&len);
            raw.extend_from_slice(&f);
            fields.push(f);
        }
        let wrapped = fields.pop().unwrap_or_default();
        let id = fields.pop().unwrap_or_default();
        let name = String::from_utf8(fields.pop().unwrap_or_default()).map_err(|_| not_ours())?;
        Ok((
            Header {
                chunk_size,
                prefix,
                name,
                id,
                wrapped,
            },
            raw,
        ))
    }
}

fn iv(prefix: &[u8; 4], index: u64) -> Vec<u8> {
    [&prefix[..], &index.to_be_bytes()].concat()
}

fn aad(header_hash: &[u8], index: u64, last: bool) -> Vec<u8> {
    [header_hash, &index.to_be_bytes(), &[u8::from(last)]].concat()
}

fn gcm(iv: Vec<u8>, aad: Vec<u8>) -> Mech {
    Mech {
        ty: CKM_AES_GCM,
        param: Param::Gcm {
            iv: iv.as_slice().into(),
            aad: aad.as_slice().into(),
            tag_bits: (TAG * 8) as CK_ULONG,
        },
    }
}

/// One single-part operation of `kind` through the library; the output replaces `out`.
fn single(
    lib: &Library,
    s: &mut Session,
    kind: Kind,
    mech: Mech,
    key: CK_OBJECT_HANDLE,
    data: &[u8],
    out: &mut Vec<u8>,
) -> cmkp11::error::Result<()> {
    lib.crypto_init(s, kind, mech, key)?;
    s.single(kind, data, |o| {
        out.clear();
        out.extend_from_slice(o);
        Delivery::Delivered
    })
}

/// SHA-256 computed in the token.
fn sha256(ctx: &Ctx, lib: &Library, s: &mut Session, data: &[u8]) -> R<Vec<u8>> {
    let mut out = Vec::new();
    single(
        lib,
        s,
        Kind::Digest,
        Mech::plain(CKM_SHA256),
        0,
        data,
        &mut out,
    )
    .map_err(|e| {
        CliError::new(format!(
            "token `{}`: SHA-256 of the header: {}",
            ctx.token,
            describe(&e)
        ))
    })?;
    Ok(out)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The output file, written to an unnamed temporary file (`O_TMPFILE`) in the destination
/// directory and given its name only on success, so that a killed command leaves nothing
/// behind. Where the file system has no `O_TMPFILE`, a hidden named temporary file
/// (`.NAME.cmkp11-PID-STAMP.tmp`) is used, and those left by processes that no longer run
/// are removed when the next output goes to the same directory.
struct Staged {
    /// The named temporary file, when `O_TMPFILE` was not available.
    tmp: Option<PathBuf>,
    dir: PathBuf,
    name: std::ffi::OsString,
    dest: PathBuf,
    force: bool,
    file: Option<std::io::BufWriter<File>>,
}

/// Prefix and suffix of the named temporary files of output `name`.
fn tmp_pattern(name: &std::ffi::OsStr) -> (String, &'static str) {
    (format!(".{}.cmkp11-", name.to_string_lossy()), ".tmp")
}

/// Removes the named temporary files of output `name` in `dir` whose process is gone.
fn remove_stale(dir: &Path, name: &std::ffi::OsStr) {
    let (prefix, suffix) = tmp_pattern(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let Some(rest) = n.strip_prefix(&prefix).and_then(|r| r.strip_suffix(suffix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Staged {
    fn create(dest: &Path, force: bool) -> R<Staged> {
        use std::os::unix::fs::OpenOptionsExt;
        if dest.exists() && !force {
            return fail(format!(
                "{} exists already; choose another output or pass --force to replace it",
                dest.display()
            ));
        }
        let name = dest
            .file_name()
            .ok_or_else(|| CliError::new(format!("{} is not a file name", dest.display())))?
            .to_owned();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale(&dir, &name);
        let mut staged = Staged {
            tmp: None,
            dir,
            name,
            dest: dest.to_path_buf(),
            force,
            file: None,
        };
        use rustix::fs::{Mode, OFlags, CWD};
        let unnamed = rustix::fs::openat(
            CWD,
            &staged.dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        );
        let file = match unnamed {
            Ok(fd) if Path::new("/proc/self/fd").is_dir() => File::from(fd),
            _ => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let (prefix, suffix) = tmp_pattern(&staged.name);
                let tmp = staged.dir.join(format!(
                    "{prefix}{}-{stamp:08x}{suffix}",
                    std::process::id()
                ));
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| CliError::new(format!("cannot create {}: {e}", tmp.display())))?;
                staged.tmp = Some(tmp);
                f
            }
        };
        staged.file = Some(std::io::BufWriter::with_capacity(1 << 16, file));
        Ok(staged)
    }

    fn shown(&self) -> String {
        match &self.tmp {
            Some(t) => t.display().to_string(),
            None => format!("{} (unnamed until complete)", self.dest.display()),
        }
    }

    fn write(&mut self, data: &[u8]) -> R<()> {
        let f = self.file.as_mut().expect("open until commit");
        f.write_all(data)
            .map_err(|e| CliError::new(format!("cannot write {}: {e}", self.shown())))
    }

    fn commit(mut self) -> R<()> {
        let w = self.file.take().expect("open until commit");
        let shown = self.shown();
        let bad = |e: std::io::Error| CliError::new(format!("cannot write {shown}: {e}"));
        let f = w.into_inner().map_err(|e| bad(e.into_error()))?;
        f.sync_all().map_err(bad)?;
        let renamed = |from: &Path| {
            std::fs::rename(from, &self.dest).map_err(|e| {
                CliError::new(format!(
                    "cannot rename {} to {}: {e}",
                    from.display(),
                    self.dest.display()
                ))
            })
        };
        if let Some(tmp) = self.tmp.take() {
            drop(f);
            let r = renamed(&tmp);
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            return r;
        }
        // Give the unnamed file a name: directly the destination when it must not be
        // replaced (linkat never replaces), else a hidden name renamed over it.
        use std::os::fd::AsRawFd;
        let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let link = |to: &Path| {
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc_path.as_str(),
                rustix::fs::CWD,
                to,
                rustix::fs::AtFlags::SYMLINK_FOLLOW,
            )
            .map_err(|e| {
                CliError::new(format!(
                    "cannot create {}: {}",
                    to.display(),
                    std::io::Error::from(e)
                ))
            })
        };
        if !self.force {
            return link(&self.dest);
        }
        let (prefix, suffix) = tmp_pattern(&self.name);
        let tmp = self
            .dir
            .join(format!("{prefix}{}-link{suffix}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        link(&tmp)?;
        let r = renamed(&tmp);
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.file.take();
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

fn open_input(path: &Path, output: &Path) -> R<(BufReader<File>, u64)> {
    let f = File::open(path)
        .map_err(|e| CliError::new(format!("cannot open {}: {e}", path.display())))?;
    let meta = f
        .metadata()
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", path.display())))?;
    if meta.is_dir() {
        return fail(format!("{} is a directory", path.display()));
    }
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(o) = std::fs::metadata(output) {
            if o.dev() == meta.dev() && o.ino() == meta.ino() {
                return fail(format!(
                    "the output {} is the input file; write to another file",
                    output.display()
                ));
            }
        }
    }
    Ok((BufReader::with_capacity(1 << 16, f), meta.len()))
}

/// Refuses a CMK that cannot be used now, saying what to do.
fn usable(ctx: &Ctx, cmk: &Cmk, verb: &str) -> R<()> {
    let name = cmk.name();
    let t = &ctx.token;
    match cmk.state(keystore::now()) {
        State::Enabled => Ok(()),
        State::Disabled => fail(format!(
            "key `{name}` on token `{t}` is disabled, so it cannot {verb}; enable it with \
             `cmkp11 key enable {name}`"
        )),
        State::PendingDeletion => fail(format!(
            "key `{name}` on token `{t}` is pending deletion (on {}), so it cannot {verb}; to \
             keep it, `cmkp11 key cancel-deletion {name}` then `cmkp11 key enable {name}`",
            output::time_cell(cmk.record().deletion_date)
        )),
        State::Destroyed => fail(format!(
            "key `{name}` on token `{t}` is destroyed: nothing it protected can be decrypted"
        )),
    }
}

#[derive(serde::Serialize)]
struct Report {
    input: PathBuf,
    output: PathBuf,
    key: String,
    key_id: String,
    bytes: u64,
    chunks: u64,
    seconds: f64,
}

/// `cmkp11 encrypt --key NAME IN OUT`.
pub fn encrypt(g: &Global, a: EncryptArgs) -> R<()> {
    let (mut input, total) = open_input(&a.input, &a.output)?;
    let ctx = Ctx::open(g)?;
    let t = ctx.token.clone();
    let cmk = ctx.cmk(&a.key)?;
    let info = key_info(&ctx, &cmk)?;
    if cmk.class != CKO_SECRET_KEY || info.role != "wrap" {
        return fail(format!(
            "key `{}` on token `{t}` has role {} ({}); envelope encryption needs a wrap \
             key: create one with `cmkp11 key create NAME --role wrap`",
            a.key, info.role, info.key_type
        ));
    }
    usable(&ctx, &cmk, "encrypt")?;
    ctx.require(&[Capability::AesKwp, Capability::AesGcm])?;
    let dek_len: u64 = match info.key_type.as_str() {
        "AES-128" => 16,
        _ => 32,
    };
    let cmk_h = ctx.handle_of(&cmk)?;
    let mut out = Staged::create(&a.output, a.force)?;
    let (lib, mut guard) = ctx.parts();
    let s = &mut *guard;
    let e = |what: &str| {
        let what = format!("{what} (key `{}`)", a.key);
        let t = t.clone();
        move |e: cmkp11::error::Error| {
            CliError::new(format!("token `{t}`: {what}: {}", describe(&e)))
        }
    };
    let dek = lib
        .generate_key(
            s,
            Mech::plain(CKM_AES_KEY_GEN),
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::ValueLen(dek_len.into()),
                Attribute::Encrypt(true),
                Attribute::Decrypt(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
            ],
        )
        .map_err(e("generate the data key"))?;
    let mut wrapped = Vec::new();
    lib.wrap_key(
        s,
        Mech::plain(CKM_AES_KEY_WRAP_PAD),
        cmk_h,
        dek,
        |b| {
            wrapped = b.to_vec();
            Delivery::Delivered
        },
        None,
    )
    .map_err(e("wrap the data key"))?;
    let mut prefix = [0u8; 4];
    s.backend()
        .generate_random_slice(&mut prefix)
        .map_err(|x| e("random nonce")(x.into()))?;
    let header = Header {
        chunk_size: a.chunk_size,
        prefix,
        name: cmk.name(),
        id: cmk.id.clone(),
        wrapped,
    };
    let raw = header.encode();
    let hash = sha256(&ctx, lib, s, &raw)?;
    out.write(&raw)?;
    let mut progress = Progress::new("encrypt", total, !a.quiet && !g.json);
    let mut buf = vec![0u8; a.chunk_size as usize];
    let mut sealed = Vec::with_capacity(buf.len() + TAG);
    let mut index = 0u64;
    loop {
        let read =
            |input: &mut BufReader<File>, buf: &mut [u8]| -> std::io::Result<(usize, bool)> {
                let n = read_full(input, buf)?;
                let last = n < buf.len() || input.fill_buf()?.is_empty();
                Ok((n, last))
            };
        let (n, last) = read(&mut input, &mut buf).map_err(|x| {
            progress.abandon();
            CliError::new(format!("cannot read {}: {x}", a.input.display()))
        })?;
        single(
            lib,
            s,
            Kind::Encrypt,
            gcm(iv(&prefix, index), aad(&hash, index, last)),
            dek,
            &buf[..n],
            &mut sealed,
        )
        .map_err(|x| {
            progress.abandon();
            e(&format!("encrypt chunk {index}"))(x)
        })?;
        out.write(&sealed)?;
        progress.add(n as u64);
        index += 1;
        if last {
            break;
        }
    }
    progress.finish();
    drop(guard);
    out.commit()?;
    let report = Report {
        input: a.input,
        output: a.output,
        key: cmk.name(),
        key_id: keystore::hex(&cmk.id),
        bytes: progress.done(),
        chunks: index,
        seconds: progress.elapsed(),
    };
    if g.json {
        return output::json(&report);
    }
    println!(
        "encrypted {} ({} bytes) to {} under key `{}` (version {}) on token `{t}`",
        report.input.display(),
        report.bytes,
        report.output.display(),
        report.key,
        info.primary
    );
    Ok(())
}

/// `cmkp11 decrypt IN OUT`.
pub fn decrypt(g: &Global, a: DecryptArgs) -> R<()> {
    let (mut input, total) = open_input(&a.input, &a.output)?;
    let (header, raw) = Header::read(&mut input, &a.input)?;
    let ctx = Ctx::open(g)?;
    let t = ctx.token.clone();
    let view = ctx.view();
    let Some(cmk) = view.cmks.get(&header.id).cloned() else {
        return fail(format!(
            "{} was encrypted under key `{}` (id {}), which is not on token `{t}`: it was \
             deleted, or the file comes from another token (choose it with --token)",
            a.input.display(),
            header.name,
            keystore::hex(&header.id)
        ));
    };
    usable(&ctx, &cmk, "decrypt")?;
    ctx.require(&[Capability::AesKwp, Capability::AesGcm])?;
    let cmk_h = ctx.handle_of(&cmk)?;
    let body = total.saturating_sub(raw.len() as u64);
    let mut out = Staged::create(&a.output, a.force)?;
    let (lib, mut guard) = ctx.parts();
    let s = &mut *guard;
    let name = cmk.name();
    let dek = lib
        .unwrap_key(
            s,
            Mech::plain(CKM_AES_KEY_WRAP_PAD),
            cmk_h,
            &header.wrapped,
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
            ],
        )
        .map_err(|e| {
            CliError::new(match e.rv() {
                CKR_WRAPPED_KEY_INVALID => format!(
                    "the data key in the header of {} does not unwrap under any enabled \
                     version of key `{name}` on token `{t}`: the file was modified, or it was \
                     made under another key with the same id",
                    a.input.display()
                ),
                _ => format!(
                    "token `{t}`: unwrap the data key of {} with key `{name}`: {}",
                    a.input.display(),
                    describe(&e)
                ),
            })
        })?;
    let hash = sha256(&ctx, lib, s, &raw)?;
    let mut progress = Progress::new("decrypt", body, !a.quiet && !g.json);
    let full = header.chunk_size as usize + TAG;
    let mut buf = vec![0u8; full];
    let mut plain = Vec::with_capacity(full);
    let mut index = 0u64;
    let mut bytes = 0u64;
    let damaged = |index: u64, how: &str| {
        CliError::new(format!(
            "{} is damaged: chunk {index} {how}; nothing was written to {}",
            a.input.display(),
            a.output.display()
        ))
    };
    loop {
        let n = read_full(&mut input, &mut buf)
            .map_err(|x| CliError::new(format!("cannot read {}: {x}", a.input.display())))?;
        let last = n < full
            || input
                .fill_buf()
                .map_err(|x| CliError::new(format!("cannot read {}: {x}", a.input.display())))?
                .is_empty();
        if n < TAG {
            progress.abandon();
            return Err(damaged(
                index,
                "is missing or cut short: the file is truncated",
            ));
        }
        let r = single(
            lib,
            s,
            Kind::Decrypt,
            gcm(iv(&header.prefix, index), aad(&hash, index, last)),
            dek,
            &buf[..n],
            &mut plain,
        );
        if let Err(e) = r {
            progress.abandon();
            return Err(match e.rv() {
                CKR_ENCRYPTED_DATA_INVALID | CKR_ENCRYPTED_DATA_LEN_RANGE if last => damaged(
                    index,
                    "does not authenticate: the file was truncated or modified",
                ),
                CKR_ENCRYPTED_DATA_INVALID | CKR_ENCRYPTED_DATA_LEN_RANGE => {
                    damaged(index, "does not authenticate: the file was modified")
                }
                _ => CliError::new(format!(
                    "token `{t}`: decrypt chunk {index} of {} with key `{name}`: {}",
                    a.input.display(),
                    describe(&e)
                )),
            });
        }
        out.write(&plain)?;
        bytes += plain.len() as u64;
        progress.add(n as u64);
        index += 1;
        if last {
            break;
        }
    }
    progress.finish();
    drop(guard);
    out.commit()?;
    let report = Report {
        input: a.input,
        output: a.output,
        key: name,
        key_id: keystore::hex(&cmk.id),
        bytes,
        chunks: index,
        seconds: progress.elapsed(),
    };
    if g.json {
        return output::json(&report);
    }
    println!(
        "decrypted {} to {} ({} bytes) with key `{}` on token `{t}`",
        report.input.display(),
        report.output.display(),
        report.bytes,
        report.key
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            chunk_size: DEFAULT_CHUNK,
            prefix: [1, 2, 3, 4],
            name: "payments".into(),
            id: vec![9; 16],
            wrapped: vec![7; 40],
        };
        let raw = h.encode();
        assert_eq!(&raw[..8], MAGIC);
        let mut body = raw.clone();
        body.extend_from_slice(b"chunks follow");
        let mut r = &body[..];
        let (back, bytes) = Header::read(&mut r, Path::new("f")).unwrap();
        assert_eq!(back, h);
        assert_eq!(bytes, raw);
        assert_eq!(r, b"chunks follow");
    }

    #[test]
    fn header_refusals() {
        let h = Header {
            chunk_size: DEFAULT_CHUNK,
            prefix: [0; 4],
            name: "k".into(),
            id: vec![1],
            wrapped: vec![2; 40],
        };
        let raw = h.encode();
        let mut bad_magic = raw.clone();
        bad_magic[0] ^= 1;
        assert!(Header::read(&mut &bad_magic[..], Path::new("f")).is_err());
        let mut newer = raw.clone();
        newer[8] = 2;
        let e = Header::read(&mut &newer[..], Path::new("f")).unwrap_err();
        assert!(e.msg.contains("version 2"), "{}", e.msg);
        let cut = &raw[..raw.len() - 1];
        assert!(Header::read(&mut &cut[..], Path::new("f")).is_err());
        let mut tiny = raw.clone();
        tiny[10..14].copy_from_slice(&16u32.to_be_bytes());
        assert!(Header::read(&mut &tiny[..], Path::new("f")).is_err());
    }

    #[test]
    fn nonces_and_aad_are_distinct() {
        let p = [1, 2, 3, 4];
        assert_eq!(iv(&p, 1), [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_ne!(aad(&[0; 32], 1, false), aad(&[0; 32], 1, true));
        assert_ne!(aad(&[0; 32], 1, false), aad(&[0; 32], 2, false));
    }
}
