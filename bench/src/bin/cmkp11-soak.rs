//! `cmkp11-soak`: a soak run of a PKCS#11 module (not CI; `scripts/soak.sh` prepares the
//! token and runs it). N threads (default 16) run mixed operations for a while (default
//! 10 minutes): AES-GCM encrypt + decrypt with a data CMK, AES-KWP wrap + unwrap of a
//! session key with a wrapping CMK, ECDSA P-256 sign, find by label, session open/close,
//! and `C_Login` (answered `CKR_USER_ALREADY_LOGGED_IN`, recorded all the same); then
//! `--cycles` (default 100) `C_Initialize`/login/use/`C_Finalize` cycles. It prints the
//! operations and errors per kind, the RSS and the number of open file descriptors at the
//! start and at the end (both taken initialized and logged in, after a first key use), and,
//! with `--audit-log`, the records the run added to the audit log per operation next to
//! the operations it counted (they must be equal). Exit status 1 if any operation failed
//! or a count differs.
//!
//! ```text
//! cmkp11-soak --module M --token T --pin P [--threads 16] [--minutes 10 | --seconds S]
//!             [--cycles 100] [--audit-log FILE]
//! ```

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DATA: &str = "soak-data";
const KEK: &str = "soak-kek";
const EC: &str = "soak-ec";
const EC_PUB: &str = "soak-ec-pub";
/// DER of the P-256 curve OID.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The kinds of operations, in the order the threads cycle through them.
const KINDS: [&str; 7] = [
    "gcm",
    "kwp",
    "ecdsa",
    "find",
    "session",
    "login",
    "gcm-large",
];

type R<T> = Result<T, String>;

struct Opts {
    module: String,
    token: String,
    pin: String,
    threads: usize,
    run: Duration,
    cycles: usize,
    audit_log: Option<String>,
}

fn opts() -> R<Opts> {
    let mut o = Opts {
        module: String::new(),
        token: String::new(),
        pin: String::new(),
        threads: 16,
        run: Duration::from_secs(600),
        cycles: 100,
        audit_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{k}: not a number"));
        match k.as_str() {
            "--module" => o.module = v,
            "--token" => o.token = v,
            "--pin" => o.pin = v,
            "--threads" => o.threads = num(&v)? as usize,
            "--minutes" => o.run = Duration::from_secs_f64(num(&v)? * 60.0),
            "--seconds" => o.run = Duration::from_secs_f64(num(&v)?),
            "--cycles" => o.cycles = num(&v)? as usize,
            "--audit-log" => o.audit_log = Some(v),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if o.module.is_empty() || o.token.is_empty() || o.pin.is_empty() {
        return Err(
            "usage: cmkp11-soak --module M --token T --pin P [--threads N] \
                    [--minutes M | --seconds S] [--cycles N] [--audit-log FILE]"
                .into(),
        );
    }
    Ok(o)
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

fn open(o: &Opts) -> R<(Pkcs11, Slot)> {
    let p = Pkcs11::new(&o.module).map_err(e("load the module"))?;
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(e("C_Initialize"))?;
    for slot in p.get_slots_with_token().map_err(e("C_GetSlotList"))? {
        let info = p.get_token_info(slot).map_err(e("C_GetTokenInfo"))?;
        if info.label() == o.token {
            return Ok((p, slot));
        }
    }
    Err(format!("no token {:?}", o.token))
}

fn login(p: &Pkcs11, slot: Slot, pin: &str) -> R<Session> {
    let s = p.open_rw_session(slot).map_err(e("C_OpenSession"))?;
    s.login(UserType::User, Some(&AuthPin::new(pin.into())))
        .map_err(e("C_Login"))?;
    Ok(s)
}

fn find(s: &Session, label: &str) -> R<ObjectHandle> {
    let v = s
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .map_err(e("C_FindObjects"))?;
    match v.as_slice() {
        [h] => Ok(*h),
        _ => Err(format!("{} objects labelled {label:?}", v.len())),
    }
}

/// The soak's keys, made once (by label).
fn setup(s: &Session) -> R<()> {
    let exists = |l: &str| {
        s.find_objects(&[Attribute::Label(l.as_bytes().to_vec())])
            .map(|v| !v.is_empty())
            .map_err(e("C_FindObjects"))
    };
    for (label, wrap) in [(DATA, false), (KEK, true)] {
        if exists(label)? {
            continue;
        }
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::ValueLen(32.into()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        if wrap {
            t.extend([Attribute::Wrap(true), Attribute::Unwrap(true)]);
        } else {
            t.extend([Attribute::Encrypt(true), Attribute::Decrypt(true)]);
        }
        s.generate_key(&Mechanism::AesKeyGen, &t)
            .map_err(e("generate an AES CMK"))?;
    }
    if !exists(EC)? {
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::EcParams(P256.to_vec()),
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::Label(EC_PUB.as_bytes().to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Label(EC.as_bytes().to_vec()),
            ],
        )
        .map_err(e("generate the EC key pair"))?;
    }
    Ok(())
}

/// Operations counted, and the audit records they must produce (op name -> count).
#[derive(Default)]
struct Counts {
    ops: BTreeMap<&'static str, AtomicU64>,
    errors: BTreeMap<&'static str, AtomicU64>,
    records: BTreeMap<&'static str, AtomicU64>,
    first_errors: Mutex<Vec<String>>,
}

impl Counts {
    fn new() -> Counts {
        let mut c = Counts::default();
        for k in KINDS.iter().chain(["cycle"].iter()) {
            c.ops.insert(k, AtomicU64::new(0));
            c.errors.insert(k, AtomicU64::new(0));
        }
        for r in ["encrypt", "decrypt", "wrap", "unwrap", "sign", "login"] {
            c.records.insert(r, AtomicU64::new(0));
        }
        c
    }
    fn rec(&self, op: &str, n: u64) {
        self.records[op].fetch_add(n, Ordering::Relaxed);
    }
    fn done(&self, kind: &'static str, r: R<()>) {
        match r {
            Ok(()) => self.ops[kind].fetch_add(1, Ordering::Relaxed),
            Err(m) => {
                let mut f = self.first_errors.lock().unwrap();
                if f.len() < 10 {
                    f.push(format!("{kind}: {m}"));
                }
                self.errors[kind].fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

struct Keys {
    data: ObjectHandle,
    kek: ObjectHandle,
    ec: ObjectHandle,
}

fn gcm(s: &Session, key: ObjectHandle, n: u64, len: usize, c: &Counts) -> R<()> {
    let mut iv = [0u8; 12];
    iv[..8].copy_from_slice(&n.to_be_bytes());
    let pt = vec![(n & 0xff) as u8; len];
    let mut ive = iv;
    let p = GcmParams::new(&mut ive, b"soak", 128.into()).map_err(e("GCM params"))?;
    let ct = s.encrypt(&Mechanism::AesGcm(p), key, &pt);
    c.rec("encrypt", 1);
    let ct = ct.map_err(e("C_Encrypt"))?;
    let mut ivd = iv;
    let p = GcmParams::new(&mut ivd, b"soak", 128.into()).map_err(e("GCM params"))?;
    let back = s.decrypt(&Mechanism::AesGcm(p), key, &ct);
    c.rec("decrypt", 1);
    if back.map_err(e("C_Decrypt"))? != pt {
        return Err("GCM round trip differs".into());
    }
    Ok(())
}

fn kwp(s: &Session, kek: ObjectHandle, c: &Counts) -> R<()> {
    let dek_template = |extractable: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ]
    };
    let mut t = dek_template(true);
    t.push(Attribute::ValueLen(32.into()));
    let dek = s
        .generate_key(&Mechanism::AesKeyGen, &t)
        .map_err(e("generate a DEK"))?;
    let r = (|| {
        let w = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dek);
        c.rec("wrap", 1);
        let w = w.map_err(e("C_WrapKey"))?;
        let h = s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &w, &dek_template(false));
        c.rec("unwrap", 1);
        let h = h.map_err(e("C_UnwrapKey"))?;
        s.destroy_object(h).map_err(e("destroy the unwrapped DEK"))
    })();
    s.destroy_object(dek).map_err(e("destroy the DEK"))?;
    r
}

fn worker(p: &Pkcs11, slot: Slot, o: &Opts, keys: &Keys, id: usize, until: Instant, c: &Counts) {
    let s = match p.open_rw_session(slot) {
        Ok(s) => s,
        Err(err) => return c.done("session", Err(format!("C_OpenSession: {err}"))),
    };
    let mut n: u64 = (id as u64) << 40;
    let mut i = id;
    while Instant::now() < until {
        let kind = KINDS[i % KINDS.len()];
        i += 1;
        n += 1;
        let r = match kind {
            "gcm" => gcm(&s, keys.data, n, 64, c),
            "gcm-large" => gcm(&s, keys.data, n, 16 * 1024, c),
            "kwp" => kwp(&s, keys.kek, c),
            "ecdsa" => {
                let r = s.sign(&Mechanism::Ecdsa, keys.ec, &[0x5a; 32]);
                c.rec("sign", 1);
                r.map_err(e("C_Sign")).and_then(|sig| {
                    (sig.len() == 64)
                        .then_some(())
                        .ok_or_else(|| "signature length".to_string())
                })
            }
            "find" => find(&s, DATA).and_then(|h| {
                (h == keys.data)
                    .then_some(())
                    .ok_or_else(|| "find: another handle".to_string())
            }),
            "session" => p
                .open_rw_session(slot)
                .map_err(e("C_OpenSession"))
                .and_then(|extra| {
                    let info = extra.get_session_info().map_err(e("C_GetSessionInfo"));
                    drop(extra);
                    info.map(|_| ())
                }),
            _ => {
                // The application is logged in already: the token answers
                // CKR_USER_ALREADY_LOGGED_IN, and cmkp11 records the attempt.
                let r = s.login(UserType::User, Some(&AuthPin::new(o.pin.clone().into())));
                c.rec("login", 1);
                match r {
                    Ok(()) => Ok(()),
                    Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::UserAlreadyLoggedIn,
                        _,
                    )) => Ok(()),
                    Err(err) => Err(format!("C_Login: {err}")),
                }
            }
        };
        c.done(kind, r);
    }
}

/// RSS (KiB) and open file descriptors of this process.
fn usage() -> (u64, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    (rss, fds)
}

/// Records in the audit log per op (only the ops the soak counts).
fn audit_counts(path: &str) -> R<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{path}: {err}"))?;
    let mut m = BTreeMap::new();
    for line in text.lines() {
        // the op is a plain JSON string field; records of the soak's keys and logins only
        let field = |name: &str| {
            let pat = format!("\"{name}\":\"");
            let at = line.find(&pat)? + pat.len();
            Some(&line[at..at + line[at..].find('"')?])
        };
        let Some(op) = field("op") else { continue };
        let key = field("key").unwrap_or("");
        let ours = matches!(key, DATA | KEK | EC) || op == "login";
        if ours && ["encrypt", "decrypt", "wrap", "unwrap", "sign", "login"].contains(&op) {
            *m.entry(op.to_string()).or_insert(0) += 1;
        }
    }
    Ok(m)
}

fn main() {
    if let Err(m) = run() {
        eprintln!("cmkp11-soak: {m}");
        std::process::exit(1);
    }
}

fn run() -> R<()> {
    let o = opts()?;
    let c = Counts::new();
    let before = match &o.audit_log {
        Some(p) => audit_counts(p).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let t0 = Instant::now();
    let (p, slot) = open(&o)?;
    let s = login(&p, slot, &o.pin)?;
    c.rec("login", 1);
    setup(&s)?;
    let keys = Keys {
        data: find(&s, DATA)?,
        kek: find(&s, KEK)?,
        ec: find(&s, EC)?,
    };
    gcm(&s, keys.data, 1, 64, &c)?;
    let (rss0, fds0) = usage();
    println!(
        "start: RSS {rss0} KiB, {fds0} open fds ({} threads x {:.0} s, then {} init/finalize cycles)",
        o.threads,
        o.run.as_secs_f64(),
        o.cycles
    );
    let until = Instant::now() + o.run;
    std::thread::scope(|sc| {
        for id in 0..o.threads {
            let (p, o, keys, c) = (&p, &o, &keys, &c);
            sc.spawn(move || worker(p, slot, o, keys, id, until, c));
        }
    });
    let mixed = t0.elapsed();
    let (rss_m, fds_m) = usage();
    drop(s);
    p.finalize().map_err(e("C_Finalize"))?;
    let mut at10 = None;
    // C_Initialize / C_Finalize cycles, each with a login and a key use.
    for i in 0..o.cycles {
        let r = (|| {
            let (p, slot) = open(&o)?;
            let s = login(&p, slot, &o.pin)?;
            c.rec("login", 1);
            gcm(&s, find(&s, DATA)?, 2 + i as u64, 64, &c)?;
            drop(s);
            p.finalize().map_err(e("C_Finalize"))
        })();
        c.done("cycle", r);
        if i + 1 == 10.min(o.cycles) {
            at10 = Some(usage());
        }
    }
    // The end, in the state of the start: initialized, logged in, a key used.
    let (p, slot) = open(&o)?;
    let s = login(&p, slot, &o.pin)?;
    c.rec("login", 1);
    gcm(&s, find(&s, DATA)?, 3, 64, &c)?;
    let (rss1, fds1) = usage();
    drop(s);
    p.finalize().map_err(e("C_Finalize"))?;
    let total = t0.elapsed();

    let mut failed = false;
    let (mut ops, mut errs) = (0, 0);
    println!(
        "operations ({:.0} s mixed, {:.0} s in all):",
        mixed.as_secs_f64(),
        total.as_secs_f64()
    );
    for (k, n) in &c.ops {
        let (n, x) = (
            n.load(Ordering::Relaxed),
            c.errors[k].load(Ordering::Relaxed),
        );
        ops += n;
        errs += x;
        println!("  {k:<10} {n:>10} ok {x:>6} errors");
    }
    println!("  {:<10} {ops:>10} ok {errs:>6} errors", "all");
    for m in c.first_errors.lock().unwrap().iter() {
        println!("  error: {m}");
    }
    failed |= errs > 0;
    println!("after the mixed phase: RSS {rss_m} KiB, {fds_m} open fds (initialized)");
    if let Some((r, f)) = at10 {
        println!(
            "after {} cycles: RSS {r} KiB, {f} open fds (finalized)",
            10.min(o.cycles)
        );
    }
    println!(
        "end:   RSS {rss1} KiB ({:+} KiB), {fds1} open fds ({:+})",
        rss1 as i64 - rss0 as i64,
        fds1 as i64 - fds0 as i64
    );
    if let Some(path) = &o.audit_log {
        let after = audit_counts(path)?;
        println!("audit records added by the run vs operations counted:");
        for (op, n) in &c.records {
            let want = n.load(Ordering::Relaxed);
            let got = after.get(*op).copied().unwrap_or(0) - before.get(*op).copied().unwrap_or(0);
            let same = got == want;
            failed |= !same;
            println!(
                "  {op:<8} {got:>10} records {want:>10} counted {}",
                if same { "equal" } else { "DIFFERENT" }
            );
        }
    }
    if failed {
        return Err("errors or count differences (see above)".into());
    }
    Ok(())
}
