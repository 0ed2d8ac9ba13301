//! Bring your own key through the `cmkp11` command, with `openssl` on the customer's side
//! (skipped with a message when openssl is missing).

mod cli_support;

use cli_support::{contains, have, Env};
use std::process::Command;

const ALLOW: &str = "[policy]\nallow_import = true";

fn openssl(env: &Env, args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(env.dir())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn skip() -> bool {
    if have("openssl") {
        return false;
    }
    eprintln!("SKIP: openssl is not installed (scripts/setup.sh installs it)");
    true
}

/// The customer's side (docs/byok.md): a 32-byte key wrapped with RSA-OAEP SHA-256.
fn wrap_for(env: &Env, pem: &str, key: &str, wrapped: &str) {
    wrap_with(env, pem, key, wrapped, "sha256");
}

/// Wraps a fresh 32-byte key with RSA-OAEP using `md` for OAEP and MGF1.
fn wrap_with(env: &Env, pem: &str, key: &str, wrapped: &str, md: &str) {
    let (oaep, mgf) = (format!("rsa_oaep_md:{md}"), format!("rsa_mgf1_md:{md}"));
    openssl(env, &["rand", "-out", key, "32"]);
    openssl(
        env,
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            pem,
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            &oaep,
            "-pkeyopt",
            &mgf,
            "-in",
            key,
            "-out",
            wrapped,
        ],
    );
}

#[test]
fn import_is_refused_unless_the_configuration_allows_it() {
    let env = Env::new();
    let err = env.fails(&["key", "import-key", "create", "ik"]);
    contains(&err, "import is disabled on token `cli-test`");
    contains(&err, "[policy]\nallow_import = true");
    contains(&err, &env.config.display().to_string());
    assert!(!env.path("ik.pem").exists());
    std::fs::write(env.path("blob"), [7u8; 384]).unwrap();
    // Even with an import key made while it was allowed.
    env.set_config(ALLOW);
    env.ok(&["key", "import-key", "create", "ik"]);
    env.set_config("");
    let err = env.fails(&[
        "key",
        "import",
        "mine",
        "--import-key",
        "ik",
        "--wrapped",
        "blob",
    ]);
    contains(&err, "allow_import = true");
    assert!(env.run(&["key", "show", "mine"]).status.code() == Some(1));
}

#[test]
fn import_key_public_key_is_a_valid_spki_pem() {
    if skip() {
        return;
    }
    let env = Env::with_config(ALLOW);
    let out = env.ok(&["key", "import-key", "create", "ik", "--out", "import.pem"]);
    contains(&out, "created import key `ik`");
    let text = openssl(
        &env,
        &["pkey", "-pubin", "-in", "import.pem", "-noout", "-text"],
    );
    contains(
        &String::from_utf8_lossy(&text.stdout),
        "Public-Key: (3072 bit)",
    );
    contains(&String::from_utf8_lossy(&text.stdout), "Exponent: 65537");
    // Our DER is canonical: openssl re-encodes it byte for byte.
    openssl(
        &env,
        &["pkey", "-pubin", "-in", "import.pem", "-out", "again.pem"],
    );
    assert_eq!(
        std::fs::read_to_string(env.path("import.pem")).unwrap(),
        std::fs::read_to_string(env.path("again.pem")).unwrap()
    );
    // `public` writes the same key again; default file name NAME.pem.
    env.ok(&["key", "import-key", "public", "ik"]);
    assert_eq!(
        std::fs::read(env.path("import.pem")).unwrap(),
        std::fs::read(env.path("ik.pem")).unwrap()
    );
    // The import key is listed as an unwrap-only RSA private key.
    let show = env.show("ik");
    assert_eq!(show["class"], "private");
    assert_eq!(show["key_type"], "RSA-3072");
    assert_eq!(show["role"], "unwrap");
    // openssl can wrap a key for it.
    wrap_for(&env, "import.pem", "byok.key", "byok.wrapped");
    assert_eq!(
        std::fs::metadata(env.path("byok.wrapped")).unwrap().len(),
        384
    );

    // Refusals: names taken, not an import key, unknown import key, junk blobs.
    let err = env.fails(&["key", "import-key", "create", "ik"]);
    contains(&err, "exists already");
    env.ok(&["key", "create", "w"]);
    let err = env.fails(&[
        "key",
        "import",
        "x",
        "--import-key",
        "w",
        "--wrapped",
        "byok.wrapped",
    ]);
    contains(&err, "key `w` on token `cli-test` is not an import key");
    let err = env.fails(&[
        "key",
        "import",
        "x",
        "--import-key",
        "nope",
        "--wrapped",
        "byok.wrapped",
    ]);
    contains(&err, "no key named `nope`");
    let err = env.fails(&[
        "key",
        "import",
        "w",
        "--import-key",
        "ik",
        "--wrapped",
        "byok.wrapped",
    ]);
    contains(&err, "a key named `w` exists already");
    std::fs::write(env.path("empty"), b"").unwrap();
    let err = env.fails(&[
        "key",
        "import",
        "x",
        "--import-key",
        "ik",
        "--wrapped",
        "empty",
    ]);
    contains(&err, "is not a wrapped key");
    std::fs::write(env.path("junk"), [0x5au8; 384]).unwrap();
    env.fails(&[
        "key",
        "import",
        "x",
        "--import-key",
        "ik",
        "--wrapped",
        "junk",
    ]);
    assert_eq!(
        env.run(&["key", "show", "x"]).status.code(),
        Some(1),
        "no key made"
    );
    // A pending-deletion import key unwraps nothing.
    env.ok(&["key", "schedule-deletion", "ik"]);
    let err = env.fails(&[
        "key",
        "import",
        "x",
        "--import-key",
        "ik",
        "--wrapped",
        "byok.wrapped",
    ]);
    contains(
        &err,
        "import key `ik` on token `cli-test` is pending-deletion",
    );
}

/// The whole flow. SoftHSM2 2.6 implements RSA-OAEP with SHA-1 only, so the customer
/// wraps with SHA-1 and the operator imports with `--oaep-hash sha1`; SHA-256 (the
/// default) is refused with a message that says so.
#[test]
fn import_end_to_end_with_openssl() {
    if skip() {
        return;
    }
    let env = Env::with_config(ALLOW);
    env.ok(&["key", "import-key", "create", "ik", "--out", "import.pem"]);
    wrap_for(&env, "import.pem", "byok256.key", "byok256.wrapped");
    let err = env.fails(&[
        "key",
        "import",
        "k256",
        "--import-key",
        "ik",
        "--wrapped",
        "byok256.wrapped",
    ]);
    contains(&err, "--oaep-hash sha1");
    wrap_with(&env, "import.pem", "byok.key", "byok.wrapped", "sha1");
    let out = env.ok(&[
        "key",
        "import",
        "mine",
        "--import-key",
        "ik",
        "--wrapped",
        "byok.wrapped",
        "--role",
        "wrap",
        "--oaep-hash",
        "sha1",
    ]);
    contains(&out, "imported key `mine`");
    let show = env.show("mine");
    assert_eq!(show["origin"], "imported");
    assert_eq!(show["key_type"], "AES-256");
    assert_eq!(show["role"], "wrap");
    assert_eq!(show["state"], "enabled");
    // The imported key protects files like a generated one, across rotations.
    std::fs::write(env.path("p"), b"customer data").unwrap();
    env.ok(&["encrypt", "--key", "mine", "p", "p.enc"]);
    env.ok(&["key", "rotate", "mine"]);
    env.ok(&["decrypt", "p.enc", "p.out"]);
    assert_eq!(std::fs::read(env.path("p.out")).unwrap(), b"customer data");
    // The same blob cannot make a second key under the same name.
    let err = env.fails(&[
        "key",
        "import",
        "mine",
        "--import-key",
        "ik",
        "--wrapped",
        "byok.wrapped",
        "--oaep-hash",
        "sha1",
    ]);
    contains(&err, "exists already");
}
