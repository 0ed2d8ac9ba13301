//! `cmkp11-scale`: the steps of the scale benchmark (`scripts/bench-scale.sh`), one module
//! per process (SoftHSM2 is a per-process singleton and cmkp11 loads it too).
//!
//! Every subcommand loads the module given by `--module`, opens the token `--token`, logs in
//! with `--pin` and prints one JSON line on stdout:
//!
//! - `proto --label L`: makes one CMK (a token AES-256 data key) the way an application
//!   does, through the module (cmkp11: it becomes a CMK with version 1).
//! - `populate --proto L --n N --prefix P`: copies the proto's template (as the token
//!   holds it, cmkp11's id layout included) into N more keys generated in the token, labels
//!   `P00000`..; run through SoftHSM2 directly, it makes N CMKs at SoftHSM2's own rate.
//! - `ec`: makes the EC P-256 key pair `cmkp11-bench-ec` through the module.
//! - `count`: how many token secret keys the module shows (cmkp11: one per CMK).
//! - `create --count K`: K CMK creations (token AES keys, the application's template),
//!   timed; the keys are left in place (the script works on a copy of the cached token).
//! - `login --label L`: `C_Initialize` + `C_Login` + first use (find `L`, AES-GCM of 32
//!   bytes), each timed, and the RSS before and after the first use.
//! - `latency --case gcm|kwp|ecdsa --seconds S`: one thread, every call timed: ops/s, p50,
//!   p99, p99.9 and max (keys of `cmkp11-bench --setup`).
//! - `find --prefix P --n N --seconds S`: find by label, a different key of the N each call.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::collections::HashMap;
use std::time::{Duration, Instant};

type R<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

struct Args {
    cmd: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn get(&self, k: &str) -> R<&str> {
        self.opts
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("--{k} is required for `{}`", self.cmd))
    }
    fn num(&self, k: &str) -> R<usize> {
        self.get(k)?
            .parse()
            .map_err(|_| format!("--{k}: not a number"))
    }
    fn secs(&self, k: &str, default: f64) -> R<Duration> {
        match self.opts.get(k) {
            Some(v) => v
                .parse::<f64>()
                .map(Duration::from_secs_f64)
                .map_err(|_| format!("--{k}: not a number")),
            None => Ok(Duration::from_secs_f64(default)),
        }
    }
}

fn parse() -> R<Args> {
    let mut it = std::env::args().skip(1);
    let cmd = it
        .next()
        .ok_or("usage: cmkp11-scale CMD --module M --token T --pin P ...")?;
    let mut opts = HashMap::new();
    while let Some(k) = it.next() {
        let k = k
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {k:?}"))?
            .to_string();
        let v = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
        opts.insert(k, v);
    }
    Ok(Args { cmd, opts })
}

fn open(a: &Args) -> R<(Pkcs11, Slot)> {
    let module = a.get("module")?;
    let token = a.get("token")?;
    let ctx = Pkcs11::new(module).map_err(e("loading the module"))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(e("C_Initialize"))?;
    for slot in ctx.get_slots_with_token().map_err(e("C_GetSlotList"))? {
        let info = ctx.get_token_info(slot).map_err(e("C_GetTokenInfo"))?;
        if info.label().trim_end() == token {
            return Ok((ctx, slot));
        }
    }
    Err(format!("no token labelled {token:?}"))
}

fn login(ctx: &Pkcs11, slot: Slot, pin: &str) -> R<Session> {
    let s = ctx.open_rw_session(slot).map_err(e("C_OpenSession"))?;
    s.login(UserType::User, Some(&AuthPin::from(pin.to_string())))
        .map_err(e("C_Login"))?;
    Ok(s)
}

fn label(l: &str) -> Attribute {
    Attribute::Label(l.as_bytes().to_vec())
}

/// The template an application sends for a data CMK (token AES-256, encrypt/decrypt).
fn cmk_template(l: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::ValueLen(32.into()),
        label(l),
    ]
}

fn find_one(s: &Session, l: &str) -> R<ObjectHandle> {
    let found = s.find_objects(&[label(l)]).map_err(e("C_FindObjects"))?;
    match found.as_slice() {
        [h] => Ok(*h),
        _ => Err(format!(
            "{} objects labelled {l:?}, expected one",
            found.len()
        )),
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Attributes of the proto copied into every populated key (all but id and label).
const COPIED: [AttributeType; 17] = [
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Derive,
    AttributeType::Modifiable,
    AttributeType::Copyable,
    AttributeType::Destroyable,
    AttributeType::ValueLen,
];

fn populate(a: &Args, s: &Session) -> R<String> {
    let proto = find_one(s, a.get("proto")?)?;
    let n = a.num("n")?;
    let prefix = a.get("prefix")?;
    let attrs = s
        .get_attributes(proto, &[&COPIED[..], &[AttributeType::Id]].concat())
        .map_err(e("C_GetAttributeValue(proto)"))?;
    let id = attrs
        .iter()
        .find_map(|x| match x {
            Attribute::Id(i) => Some(i.clone()),
            _ => None,
        })
        .ok_or("the proto has no CKA_ID")?;
    // cmkp11's layout: the CMK's id, then `#cmkp11v` and the version (4 bytes).
    let tag = b"#cmkp11v";
    let tail = id
        .len()
        .checked_sub(tag.len() + 4)
        .filter(|&i| &id[i..i + tag.len()] == tag)
        .map(|i| id[i..].to_vec())
        .unwrap_or_default();
    let base: Vec<Attribute> = attrs
        .into_iter()
        .filter(|x| !matches!(x, Attribute::Id(_)))
        .collect();
    let start = Instant::now();
    for i in 0..n {
        let l = format!("{prefix}{i:05}");
        if !s
            .find_objects(&[label(&l)])
            .map_err(e("C_FindObjects"))?
            .is_empty()
        {
            continue;
        }
        let mut t = base.clone();
        // 16 bytes of id, distinct per key, then the proto's version tail.
        let mut kid = format!("scale{i:011}").into_bytes();
        kid.extend_from_slice(&tail);
        t.push(Attribute::Id(kid));
        t.push(label(&l));
        s.generate_key(&Mechanism::AesKeyGen, &t)
            .map_err(e("C_GenerateKey"))?;
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "cmkp11-scale: {} keys, {:.0}/s",
                i + 1,
                (i + 1) as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(format!(
        "{{\"populated\":{n},\"seconds\":{:.1}}}",
        start.elapsed().as_secs_f64()
    ))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `op` for `warm` then `dur`, timing every call; JSON summary.
fn timed(
    name: &str,
    warm: Duration,
    dur: Duration,
    mut op: impl FnMut(usize) -> R<()>,
) -> R<String> {
    let end = Instant::now() + warm;
    let mut i = 0;
    while Instant::now() < end {
        op(i)?;
        i += 1;
    }
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let end = start + dur;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        op(i)?;
        lat.push(t.elapsed().as_nanos() as u64);
        i += 1;
    }
    let total = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let us = |p: f64| percentile(&lat, p) as f64 / 1e3;
    Ok(format!(
        "{{\"case\":\"{name}\",\"ops\":{},\"ops_per_s\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}",
        lat.len(),
        lat.len() as f64 / total,
        us(50.0),
        us(99.0),
        us(99.9),
        lat.last().copied().unwrap_or(0) as f64 / 1e3
    ))
}

fn gcm_encrypt(s: &Session, key: ObjectHandle, data: &[u8]) -> R<()> {
    let mut iv = [0x24u8; 12];
    let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).map_err(e("GCM"))?);
    let ct = s.encrypt(&mech, key, data).map_err(e("C_Encrypt"))?;
    if ct.len() != data.len() + 16 {
        return Err("unexpected GCM length".into());
    }
    Ok(())
}

fn latency(a: &Args, s: &Session) -> R<String> {
    let case = a.get("case")?;
    let (warm, dur) = (a.secs("warmup", 0.3)?, a.secs("seconds", 3.0)?);
    match case {
        "gcm" => {
            let key = find_one(s, "cmkp11-bench-aes")?;
            let data = vec![0x5au8; 4096];
            timed("aes-gcm-4k-encrypt", warm, dur, |_| {
                gcm_encrypt(s, key, &data)
            })
        }
        "kwp" => {
            let wrap = find_one(s, "cmkp11-bench-wrap")?;
            let dek = s
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(true),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                        Attribute::Derive(false),
                        Attribute::ValueLen(32.into()),
                    ],
                )
                .map_err(e("C_GenerateKey(DEK)"))?;
            timed("aes-kwp-wrap", warm, dur, |_| {
                let w = s
                    .wrap_key(&Mechanism::AesKeyWrapPad, wrap, dek)
                    .map_err(e("C_WrapKey"))?;
                (w.len() == 40)
                    .then_some(())
                    .ok_or_else(|| "unexpected KWP length".into())
            })
        }
        "ecdsa" => {
            let key = find_one(s, "cmkp11-bench-ec")?;
            let digest = [0x17u8; 32];
            timed("ecdsa-p256-sign", warm, dur, |_| {
                let sig = s
                    .sign(&Mechanism::Ecdsa, key, &digest)
                    .map_err(e("C_Sign"))?;
                (sig.len() == 64)
                    .then_some(())
                    .ok_or_else(|| "unexpected ECDSA length".into())
            })
        }
        other => Err(format!("unknown latency case {other:?}")),
    }
}

fn run() -> R<String> {
    let a = parse()?;
    if a.cmd == "login" {
        // Timed from before C_Initialize: the process's first PKCS#11 call.
        let t0 = Instant::now();
        let (ctx, slot) = open(&a)?;
        let t_init = t0.elapsed();
        let s = login(&ctx, slot, a.get("pin")?)?;
        let t_login = t0.elapsed();
        let rss_before = rss_kb();
        let key = find_one(&s, a.get("label")?)?;
        gcm_encrypt(&s, key, &[7u8; 32])?;
        let t_use = t0.elapsed();
        let rss_after = rss_kb();
        return Ok(format!(
            "{{\"init_ms\":{:.2},\"login_ms\":{:.2},\"first_use_ms\":{:.2},\"total_ms\":{:.2},\"rss_before_use_kb\":{rss_before},\"rss_after_use_kb\":{rss_after}}}",
            ms(t_init),
            ms(t_login - t_init),
            ms(t_use - t_login),
            ms(t_use)
        ));
    }
    let (ctx, slot) = open(&a)?;
    let s = login(&ctx, slot, a.get("pin")?)?;
    let out = match a.cmd.as_str() {
        "proto" => {
            let l = a.get("label")?;
            if s.find_objects(&[label(l)]).map_err(e("find"))?.is_empty() {
                s.generate_key(&Mechanism::AesKeyGen, &cmk_template(l))
                    .map_err(e("C_GenerateKey(proto)"))?;
            }
            format!("{{\"proto\":{l:?}}}")
        }
        "populate" => populate(&a, &s)?,
        "ec" => {
            // The EC P-256 key pair of `cmkp11-bench --setup` (for `latency --case ecdsa`).
            if s.find_objects(&[label("cmkp11-bench-ec")])
                .map_err(e("find"))?
                .is_empty()
            {
                let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
                s.generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::EcParams(p256),
                        Attribute::Token(true),
                        Attribute::Verify(true),
                        label("cmkp11-bench-ec-pub"),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        label("cmkp11-bench-ec"),
                    ],
                )
                .map_err(e("C_GenerateKeyPair"))?;
            }
            "{\"ec\":\"cmkp11-bench-ec\"}".to_string()
        }
        "count" => {
            let n = s
                .find_objects(&[
                    Attribute::Token(true),
                    Attribute::Class(ObjectClass::SECRET_KEY),
                ])
                .map_err(e("C_FindObjects"))?
                .len();
            format!("{{\"secret_keys\":{n}}}")
        }
        "create" => {
            let k = a.num("count")?;
            let tag = std::process::id();
            // The first creation also loads cmkp11's view: not counted.
            s.generate_key(
                &Mechanism::AesKeyGen,
                &cmk_template(&format!("scale-new-{tag}-warm")),
            )
            .map_err(e("C_GenerateKey"))?;
            let start = Instant::now();
            for i in 0..k {
                s.generate_key(
                    &Mechanism::AesKeyGen,
                    &cmk_template(&format!("scale-new-{tag}-{i}")),
                )
                .map_err(e("C_GenerateKey"))?;
            }
            let secs = start.elapsed().as_secs_f64();
            format!(
                "{{\"created\":{k},\"seconds\":{secs:.3},\"per_s\":{:.1}}}",
                k as f64 / secs
            )
        }
        "latency" => latency(&a, &s)?,
        "find" => {
            let n = a.num("n")?;
            let prefix = a.get("prefix")?;
            let labels: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("{prefix}{:05}", (i * 7919) % n).into_bytes())
                .collect();
            let (warm, dur) = (a.secs("warmup", 0.3)?, a.secs("seconds", 2.0)?);
            timed("find-by-label-among-n", warm, dur, |i| {
                let found = s
                    .find_objects(&[Attribute::Label(labels[i % n].clone())])
                    .map_err(e("C_FindObjects"))?;
                (found.len() == 1)
                    .then_some(())
                    .ok_or_else(|| format!("{} objects found, expected 1", found.len()))
            })?
        }
        other => return Err(format!("unknown command {other:?}")),
    };
    s.logout().ok();
    drop(s);
    ctx.finalize().ok();
    Ok(out)
}

fn main() {
    match run() {
        Ok(line) => println!("{line}"),
        Err(err) => {
            eprintln!("cmkp11-scale: error: {err}");
            std::process::exit(1);
        }
    }
}
