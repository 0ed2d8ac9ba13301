//! `cmkp11 key create --type` (signing key pairs) and `cmkp11 key csr` (a PKCS#10 request
//! signed in the token), driven through the built binary against SoftHSM2. The requests
//! are checked by `openssl req -verify`, and their public key against the token's.

mod cli_support;

use cli_support::{contains, Env, PIN, SOFTHSM, TOKEN};
use std::process::Command;

/// `openssl ARGS` (asserts success), stdout.
fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `pkcs11-tool` on SoftHSM2 directly (the token as it is, under cmkp11).
fn softhsm_tool(env: &Env, args: &[&str]) -> String {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .args([
            "--module",
            SOFTHSM,
            "--token-label",
            TOKEN,
            "--login",
            "--pin",
            PIN,
        ])
        .args(args)
        .output()
        .expect("pkcs11-tool");
    assert!(
        out.status.success(),
        "pkcs11-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The token's objects labelled `label`, as pkcs11-tool lists them (one block each: the
/// header line, e.g. `Private Key Object; EC`, then indented attribute lines).
fn objects(env: &Env, label: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for line in softhsm_tool(env, &["--list-objects"]).lines() {
        if !line.starts_with(' ') || blocks.is_empty() {
            blocks.push(String::new());
        }
        let b = blocks.last_mut().unwrap();
        b.push_str(line);
        b.push('\n');
    }
    blocks
        .into_iter()
        .filter(|b| b.contains(&format!("label:      {label}\n")))
        .collect()
}

#[test]
fn signing_keys_are_sign_only_cmks_and_their_csrs_verify() {
    let env = Env::new();
    for (ty, key_type, spki_alg, sig_alg) in [
        ("ec-p256", "EC P-256", "id-ecPublicKey", "ecdsa-with-SHA256"),
        ("ec-p384", "EC P-384", "id-ecPublicKey", "ecdsa-with-SHA384"),
        (
            "rsa-2048",
            "RSA-2048",
            "rsaEncryption",
            "sha256WithRSAEncryption",
        ),
        (
            "rsa-3072",
            "RSA-3072",
            "rsaEncryption",
            "sha256WithRSAEncryption",
        ),
        ("ed25519", "Ed25519", "ED25519", "ED25519"),
    ] {
        let name = format!("tls-{ty}");
        let created = env.json(&["key", "create", &name, "--type", ty]);
        let key = &created["key"];
        assert_eq!(key["class"], "private", "{ty}: {created}");
        assert_eq!(key["role"], "sign", "{ty}: {created}");
        assert_eq!(key["state"], "enabled", "{ty}: {created}");
        assert_eq!(key["origin"], "generated", "{ty}: {created}");
        assert_eq!(key["key_type"], key_type, "{ty}: {created}");
        let id = key["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 32, "16 random bytes: {created}");
        let uri = created["uri"].as_str().unwrap();
        contains(uri, &format!("pkcs11:token={TOKEN};object={name};id=%"));
        contains(uri, ";type=private");

        // The CMK as `key show` sees it, and the objects as the token holds them: a
        // sensitive, never-extractable private key that may only sign, and its public key
        // with the same label and id.
        let shown = env.show(&name);
        assert_eq!(shown["role"], "sign");
        assert_eq!(shown["id"], id);
        let objs = objects(&env, &name);
        let private: Vec<&String> = objs.iter().filter(|o| o.contains("Private Key")).collect();
        let public: Vec<&String> = objs.iter().filter(|o| o.contains("Public Key")).collect();
        assert_eq!((private.len(), public.len()), (1, 1), "{ty}: {objs:?}");
        let p = private[0];
        contains(p, &format!("ID:         {id}"));
        contains(p, "Usage:      sign\n");
        contains(
            p,
            "Access:     sensitive, always sensitive, never extractable, local",
        );
        contains(public[0], &format!("ID:         {id}"));

        // The request: signed in the token, verified by OpenSSL, for the token's key.
        let csr = env.path(&format!("{name}.csr"));
        let csr_s = csr.to_str().unwrap();
        let out = env.ok(&[
            "key",
            "csr",
            &name,
            "--subject",
            "/O=Example Org/CN=web.example.com",
            "--san",
            "DNS:web.example.com",
            "--san",
            "IP:127.0.0.1",
            "--out",
            csr_s,
        ]);
        contains(&out, &format!("to {csr_s}"));
        let text = openssl(&["req", "-in", csr_s, "-verify", "-noout", "-text"]);
        contains(&text, "Subject: O = Example Org, CN = web.example.com");
        contains(&text, &format!("Public Key Algorithm: {spki_alg}"));
        contains(&text, &format!("Signature Algorithm: {sig_alg}"));
        contains(&text, "DNS:web.example.com, IP Address:127.0.0.1");
        let csr_pub = openssl(&["req", "-in", csr_s, "-noout", "-pubkey"]);
        if ty.starts_with("rsa") {
            let pub_der = env.path(&format!("{name}.pub.der"));
            let pub_s = pub_der.to_str().unwrap();
            softhsm_tool(
                &env,
                &[
                    "--read-object",
                    "--type",
                    "pubkey",
                    "--id",
                    &id,
                    "-o",
                    pub_s,
                ],
            );
            let token_pub = openssl(&["pkey", "-pubin", "-inform", "DER", "-in", pub_s]);
            assert_eq!(
                token_pub, csr_pub,
                "{ty}: the request is not for the token's key"
            );
        } else {
            // pkcs11-tool 0.23 cannot export a P-384 or Ed25519 public key ("cannot create
            // EVP_PKEY"): compare the token's CKA_EC_POINT (a DER OCTET STRING) with the
            // end of the request's SubjectPublicKeyInfo (the BIT STRING holding the point).
            let point = public[0]
                .lines()
                .find_map(|l| l.trim().strip_prefix("EC_POINT:"))
                .map(|p| p.trim()[4..].to_string())
                .unwrap_or_else(|| panic!("{ty}: no EC_POINT in {}", public[0]));
            let f = env.path(&format!("{name}.pub.pem"));
            std::fs::write(&f, &csr_pub).unwrap();
            let der = Command::new("openssl")
                .args([
                    "pkey",
                    "-pubin",
                    "-outform",
                    "DER",
                    "-in",
                    f.to_str().unwrap(),
                ])
                .output()
                .unwrap()
                .stdout;
            let spki: String = der.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                point.len() >= 64 && spki.ends_with(&point),
                "{ty}: the request's key {spki} is not the token's point {point}"
            );
        }
    }
    let list = env.json(&["key", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 5);
}

#[test]
fn csr_on_stdout_with_an_rfc4514_subject_and_a_chosen_id() {
    let env = Env::new();
    let created = env.json(&[
        "key", "create", "web", "--type", "ec-p256", "--id", "0a0b0c",
    ]);
    assert_eq!(created["key"]["id"], "0a0b0c");
    assert_eq!(
        created["uri"],
        format!("pkcs11:token={TOKEN};object=web;id=%0a%0b%0c;type=private")
    );
    let pem = env.ok(&[
        "key",
        "csr",
        "web",
        "--subject",
        "CN=web.example.com,O=Example",
    ]);
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"),
        "{pem}"
    );
    let f = env.path("web.csr");
    std::fs::write(&f, &pem).unwrap();
    let text = openssl(&[
        "req",
        "-in",
        f.to_str().unwrap(),
        "-verify",
        "-noout",
        "-subject",
    ]);
    // RFC 4514 writes the most significant RDN last.
    contains(&text, "subject=O = Example, CN = web.example.com");
    // The same id again is refused before the token is asked.
    let err = env.fails(&[
        "key", "create", "web2", "--type", "rsa-2048", "--id", "0a0b0c",
    ]);
    contains(&err, "a key with id 0a0b0c exists already");
}

#[test]
fn refusals_name_the_problem() {
    let env = Env::new();
    env.ok(&["key", "create", "wrapkey", "--role", "wrap"]);
    let err = env.fails(&["key", "csr", "wrapkey", "--subject", "CN=x"]);
    contains(&err, "key `wrapkey` on token `cli-test` is a secret key");
    let err = env.fails(&["key", "csr", "missing", "--subject", "CN=x"]);
    contains(&err, "no key named `missing`");

    env.ok(&["key", "create", "sig", "--type", "ec-p256"]);
    env.ok(&["key", "disable", "sig"]);
    let err = env.fails(&["key", "csr", "sig", "--subject", "CN=x"]);
    contains(
        &err,
        "key `sig` on token `cli-test` is disabled: it cannot sign",
    );
    let err = env.fails(&["key", "create", "sig", "--type", "ed25519"]);
    contains(&err, "a key named `sig` exists already");

    // Usage errors (exit status 2, clap's message).
    for (args, text) in [
        (
            vec!["key", "create", "x", "--type", "ec-p256", "--role", "wrap"],
            "cannot be used with",
        ),
        (
            vec!["key", "create", "x", "--type", "dsa"],
            "invalid value 'dsa'",
        ),
        (vec!["key", "create", "x", "--id", "01"], "--type <TYPE>"),
        (
            vec!["key", "create", "x", "--type", "ec-p256", "--id", "xyz"],
            "hex digits",
        ),
        (
            vec!["key", "csr", "sig", "--subject", "CN=x", "--san", "URI:x"],
            "DNS:NAME or IP:ADDRESS",
        ),
        (
            vec!["key", "csr", "sig", "--subject", "nonsense"],
            "not a distinguished name",
        ),
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        contains(&String::from_utf8_lossy(&out.stderr), text);
    }
}
