//! `cmkp11 encrypt` / `cmkp11 decrypt`: round trips, rotations, refusals, and tampered,
//! reordered or truncated files rejected with nothing written.

mod cli_support;

use cli_support::{contains, Env};

const CHUNK: usize = 4096;
const TAG: usize = 16;

/// Deterministic test data.
fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) | 0x9e37_0000;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The header's length, read from the file as the format describes it.
fn header_len(f: &[u8]) -> usize {
    assert_eq!(&f[..8], b"CMKP11FE");
    let mut at = 18;
    for _ in 0..3 {
        let n = usize::from(u16::from_be_bytes([f[at], f[at + 1]]));
        at += 2 + n;
    }
    at
}

fn write(env: &Env, name: &str, bytes: &[u8]) -> String {
    std::fs::write(env.path(name), bytes).unwrap();
    name.to_string()
}

/// Files in the directory whose name marks them as cmkp11's temporaries.
fn leftovers(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn round_trips_at_chunk_boundaries() {
    let env = Env::new();
    env.ok(&["key", "create", "files"]);
    for (i, len) in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17]
        .into_iter()
        .enumerate()
    {
        let plain = data(len, i as u8);
        let input = write(&env, &format!("p{i}"), &plain);
        let enc = format!("p{i}.enc");
        let dec = format!("p{i}.dec");
        let cs = CHUNK.to_string();
        env.ok(&[
            "encrypt",
            "--key",
            "files",
            "--chunk-size",
            &cs,
            &input,
            &enc,
        ]);
        let sealed = std::fs::read(env.path(&enc)).unwrap();
        let chunks = len.div_ceil(CHUNK).max(1);
        assert_eq!(
            sealed.len(),
            header_len(&sealed) + len + chunks * TAG,
            "size of {len}-byte file"
        );
        // The plaintext does not appear in the ciphertext.
        if len >= 64 {
            assert!(!sealed.windows(64).any(|w| w == &plain[..64]));
        }
        let out = env.ok(&["decrypt", &enc, &dec]);
        contains(&out, &format!("({len} bytes)"));
        assert_eq!(std::fs::read(env.path(&dec)).unwrap(), plain, "{len} bytes");
    }
    // The default chunk size (1 MiB) and the JSON reports.
    let plain = data(2 * (1 << 20) + 5, 9);
    write(&env, "big", &plain);
    let r = env.json(&["encrypt", "--key", "files", "big", "big.enc"]);
    assert_eq!(r["bytes"], plain.len());
    assert_eq!(r["chunks"], 3);
    assert_eq!(r["key"], "files");
    let r = env.json(&["decrypt", "big.enc", "big.dec"]);
    assert_eq!(r["bytes"], plain.len());
    assert_eq!(r["chunks"], 3);
    assert_eq!(std::fs::read(env.path("big.dec")).unwrap(), plain);
    // Two encryptions of the same file differ (fresh DEK and nonce prefix).
    env.ok(&["encrypt", "--key", "files", "big", "big2.enc"]);
    assert_ne!(
        std::fs::read(env.path("big.enc")).unwrap(),
        std::fs::read(env.path("big2.enc")).unwrap()
    );
    assert!(leftovers(&env).is_empty());
}

#[test]
fn files_stay_readable_after_rotations() {
    let env = Env::new();
    env.ok(&["key", "create", "rot"]);
    let plain = data(10_000, 1);
    write(&env, "p", &plain);
    env.ok(&[
        "encrypt",
        "--key",
        "rot",
        "--chunk-size",
        "4096",
        "p",
        "v1.enc",
    ]);
    env.ok(&["key", "rotate", "rot"]);
    env.ok(&["encrypt", "--key", "rot", "p", "v2.enc"]);
    env.ok(&["key", "rotate", "rot"]);
    env.ok(&["key", "rotate", "rot"]);
    assert_eq!(env.show("rot")["primary"], 4);
    for f in ["v1.enc", "v2.enc"] {
        let out = format!("{f}.dec");
        env.ok(&["decrypt", f, &out]);
        assert_eq!(std::fs::read(env.path(&out)).unwrap(), plain, "{f}");
    }
    // A 128-bit wrap key protects 128-bit data keys.
    env.ok(&["key", "create", "small", "--bits", "128"]);
    env.ok(&["encrypt", "--key", "small", "p", "s.enc"]);
    env.ok(&["decrypt", "s.enc", "s.dec"]);
    assert_eq!(std::fs::read(env.path("s.dec")).unwrap(), plain);
}

#[test]
fn keys_that_are_not_usable_are_refused_with_what_to_do() {
    let env = Env::new();
    env.ok(&["key", "create", "w"]);
    env.ok(&["key", "create", "d", "--role", "data"]);
    write(&env, "p", b"secret");
    env.ok(&["encrypt", "--key", "w", "p", "p.enc"]);

    // Wrong role.
    let err = env.fails(&["encrypt", "--key", "d", "p", "x.enc"]);
    contains(&err, "key `d` on token `cli-test` has role data");
    contains(&err, "--role wrap");
    // Unknown key.
    let err = env.fails(&["encrypt", "--key", "nope", "p", "x.enc"]);
    contains(&err, "no key named `nope`");

    // Disabled: both directions refused.
    env.ok(&["key", "disable", "w"]);
    let err = env.fails(&["encrypt", "--key", "w", "p", "x.enc"]);
    contains(&err, "key `w` on token `cli-test` is disabled");
    contains(&err, "cmkp11 key enable w");
    let err = env.fails(&["decrypt", "p.enc", "x"]);
    contains(&err, "is disabled, so it cannot decrypt");
    env.ok(&["key", "enable", "w"]);

    // Pending deletion: refused, with the way back.
    env.ok(&["key", "schedule-deletion", "w"]);
    let err = env.fails(&["decrypt", "p.enc", "x"]);
    contains(&err, "pending deletion");
    contains(&err, "cmkp11 key cancel-deletion w");
    let err = env.fails(&["encrypt", "--key", "w", "p", "x.enc"]);
    contains(&err, "pending deletion");
    env.ok(&["key", "cancel-deletion", "w"]);
    env.ok(&["key", "enable", "w"]);
    env.ok(&["decrypt", "p.enc", "x"]);
    assert_eq!(std::fs::read(env.path("x")).unwrap(), b"secret");

    // Existing output: refused unless --force.
    let err = env.fails(&["decrypt", "p.enc", "x"]);
    contains(&err, "exists already");
    contains(&err, "--force");
    env.ok(&["decrypt", "--force", "p.enc", "x"]);
    // The output is the input.
    let err = env.fails(&["encrypt", "--key", "w", "--force", "p", "p"]);
    contains(&err, "is the input file");
    // Not an encrypted file.
    let err = env.fails(&["decrypt", "p", "y"]);
    contains(&err, "is not a file made by `cmkp11 encrypt`");
    // A file made under a key this token does not have.
    let other = Env::new();
    other.ok(&["key", "create", "w"]);
    std::fs::write(other.path("p"), b"elsewhere").unwrap();
    other.ok(&["encrypt", "--key", "w", "p", "o.enc"]);
    std::fs::copy(other.path("o.enc"), env.path("o.enc")).unwrap();
    let err = env.fails(&["decrypt", "o.enc", "y"]);
    contains(&err, "which is not on token `cli-test`");
    assert!(!env.path("y").exists());
    assert!(leftovers(&env).is_empty());
}

/// Decrypting `bytes` must fail with `expect` in the message and write nothing.
fn rejected(env: &Env, bytes: &[u8], expect: &str, case: &str) {
    write(env, "bad.enc", bytes);
    let _ = std::fs::remove_file(env.path("bad.out"));
    let err = env.fails(&["decrypt", "bad.enc", "bad.out"]);
    assert!(
        err.contains(expect),
        "{case}: expected `{expect}` in: {err}"
    );
    assert!(!env.path("bad.out").exists(), "{case}: output written");
    assert!(leftovers(env).is_empty(), "{case}: temporary file left");
}

#[test]
fn tampered_reordered_and_truncated_files_are_rejected() {
    let env = Env::new();
    env.ok(&["key", "create", "t"]);
    let plain = data(3 * CHUNK + 100, 3);
    write(&env, "p", &plain);
    env.ok(&[
        "encrypt",
        "--key",
        "t",
        "--chunk-size",
        "4096",
        "p",
        "good.enc",
    ]);
    let good = std::fs::read(env.path("good.enc")).unwrap();
    let h = header_len(&good);
    let full = CHUNK + TAG;
    assert_eq!(good.len(), h + 3 * full + 100 + TAG);

    // A bit flipped in each chunk, in its tag, in the last chunk.
    for at in [
        h,
        h + 5,
        h + full - 1,
        h + full + 7,
        h + 3 * full + 3,
        good.len() - 1,
    ] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        rejected(&env, &b, "does not authenticate", &format!("flip at {at}"));
    }
    // Header fields: chunk size, nonce prefix, name (authenticated through the header
    // hash), the wrapped data key, the key id.
    let name_at = 18 + 2;
    let id_at = name_at + 1 + 2;
    let wrapped_at = id_at + 16 + 2;
    for (at, expect) in [
        (13, "does not authenticate"),
        (15, "does not authenticate"),
        (name_at, "does not authenticate"),
        (
            wrapped_at + 3,
            "does not unwrap under any enabled version of key `t`",
        ),
        (id_at, "which is not on token `cli-test`"),
        (0, "is not a file made by `cmkp11 encrypt`"),
    ] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        rejected(&env, &b, expect, &format!("header byte {at}"));
    }
    // Chunks swapped.
    let mut b = good.clone();
    b[h..h + full].copy_from_slice(&good[h + full..h + 2 * full]);
    b[h + full..h + 2 * full].copy_from_slice(&good[h..h + full]);
    rejected(&env, &b, "chunk 0 does not authenticate", "swapped chunks");
    // A chunk dropped from the middle.
    let b = [&good[..h + full], &good[h + 2 * full..]].concat();
    rejected(&env, &b, "does not authenticate", "dropped chunk");
    // A chunk duplicated.
    let b = [&good[..h + 2 * full], &good[h + full..]].concat();
    rejected(&env, &b, "does not authenticate", "duplicated chunk");
    // Truncated at a chunk boundary (the last full chunk was not marked last).
    let b = &good[..h + 3 * full];
    rejected(
        &env,
        b,
        "the file was truncated or modified",
        "cut at chunk boundary",
    );
    let b = &good[..h + full];
    rejected(
        &env,
        b,
        "the file was truncated or modified",
        "cut after chunk 0",
    );
    // Truncated inside a chunk, inside the tag, and right after the header.
    for cut in [h + full + 100, good.len() - 5, h + 3] {
        rejected(&env, &good[..cut], "truncated", &format!("cut at {cut}"));
    }
    rejected(&env, &good[..h], "truncated", "header only");
    // Cut inside the header.
    rejected(&env, &good[..h - 4], "is not a file made by", "cut header");
    // Bytes appended.
    let b = [&good[..], b"more"].concat();
    rejected(&env, &b, "does not authenticate", "appended bytes");
    // A header from another encryption of the same file (another data key).
    env.ok(&[
        "encrypt",
        "--key",
        "t",
        "--chunk-size",
        "4096",
        "p",
        "other.enc",
    ]);
    let other = std::fs::read(env.path("other.enc")).unwrap();
    let b = [&other[..header_len(&other)], &good[h..]].concat();
    rejected(&env, &b, "does not authenticate", "spliced header");

    // The untouched file still decrypts.
    env.ok(&["decrypt", "good.enc", "good.out"]);
    assert_eq!(std::fs::read(env.path("good.out")).unwrap(), plain);
}
