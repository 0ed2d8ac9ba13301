//! Exportable CMKs: `cmkp11 key create NAME --exportable`, `cmkp11 key destination
//! add|list` (the SO registers another token's import key as a trusted destination) and
//! `cmkp11 key export NAME --to DEST --out FILE` (the key wrapped under it, for
//! `cmkp11 key import` on the destination). See `cmkp11::runtime::export`.

use crate::ctx::{describe, lib_err, open_library, pick_token, Ctx};
use crate::keyinfo::{check_new_name, key_info, role_or_default, Role};
use crate::{fail, output, CliError, Global, R};
use clap::Subcommand;
use cmkp11::runtime::admin::OaepHash;
use cryptoki::session::UserType;
use cryptoki::types::RawAuthPin;
use cryptoki_sys::*;
use std::path::{Path, PathBuf};

/// `cmkp11 key destination` subcommands.
#[derive(Subcommand, Debug)]
pub enum DestinationCmd {
    /// Register another token's import key as a trusted destination (needs the SO PIN:
    /// only the token's Security Officer can mark a key trusted).
    Add {
        /// The destination's name.
        name: String,
        /// The destination's import public key (PEM, from `cmkp11 key import-key create`
        /// on the destination).
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
        /// A file holding this token's SO PIN (else `CMKP11_SO_PIN`).
        #[arg(long, value_name = "FILE")]
        so_pin_file: Option<PathBuf>,
    },
    /// List the trusted destinations.
    List,
}

/// `cmkp11 key create NAME --exportable`.
pub fn create_exportable(ctx: &Ctx, name: &str, role: Option<Role>, bits: u32) -> R<()> {
    check_new_name(ctx, name)?;
    let role = role_or_default(ctx, role);
    {
        let (lib, mut s) = ctx.parts();
        lib.generate_exportable_key(&mut s, name, role, u64::from(bits / 8))
            .map_err(lib_err(
                &ctx.token,
                &format!("create exportable key `{name}`"),
            ))?;
    }
    let info = key_info(ctx, &ctx.cmk(name)?)?;
    if ctx.g.json {
        return output::json(&info);
    }
    println!(
        "created key `{name}` on token `{}` ({}, role {}), exportable: it can leave the token \
         only wrapped under a trusted destination's key (`cmkp11 key destination add`, \
         `cmkp11 key export`)",
        ctx.token, info.key_type, info.role
    );
    Ok(())
}

/// `cmkp11 key export NAME --to DEST --out FILE`.
pub fn export(ctx: &Ctx, name: &str, dest: &str, out: &Path) -> R<()> {
    let cmk = ctx.cmk(name)?;
    let role = key_info(ctx, &cmk)?.role;
    let done = {
        let (lib, s) = ctx.parts();
        lib.export_key(&s, &cmk, dest).map_err(|e| {
            let t = &ctx.token;
            CliError::new(match e.rv() {
                CKR_KEY_UNEXTRACTABLE => format!(
                    "token `{t}`: key `{name}` is not exportable: only a key created with \
                     `cmkp11 key create NAME --exportable` can leave the token"
                ),
                CKR_WRAPPING_KEY_HANDLE_INVALID => format!(
                    "token `{t}`: `{dest}` is no trusted destination; the SO registers one \
                     with `cmkp11 key destination add {dest} --public-key FILE`"
                ),
                _ => format!("token `{t}`: export key `{name}`: {}", describe(&e)),
            })
        })?
    };
    std::fs::write(out, &done.blob)
        .map_err(|e| CliError::new(format!("cannot write {}: {e}", out.display())))?;
    let hash = match done.hash {
        OaepHash::Sha256 => "sha256",
        OaepHash::Sha1 => "sha1",
    };
    let bits = done.key_bytes * 8;
    if ctx.g.json {
        return output::json(&serde_json::json!({
            "key": name,
            "version": done.version,
            "destination": dest,
            "wrapped": out,
            "oaep_hash": hash,
            "bits": bits,
            "role": role,
        }));
    }
    println!(
        "exported key `{name}` (version {}) for destination `{dest}` to {}\non the \
         destination: cmkp11 key import {name} --import-key IMPORTKEY --wrapped {} \
         --oaep-hash {hash} --bits {bits} --role {role}",
        done.version,
        out.display(),
        out.display()
    );
    Ok(())
}

/// `cmkp11 key destination ...`: `add` logs in as the SO (not as the user).
pub fn destination(g: &Global, cmd: DestinationCmd) -> R<()> {
    match cmd {
        DestinationCmd::List => {
            let ctx = Ctx::open(g)?;
            let list = {
                let (lib, s) = ctx.parts();
                lib.destinations(&s)
                    .map_err(lib_err(&ctx.token, "list destinations"))?
            };
            if g.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|d| serde_json::json!({"name": d.name, "trusted": d.trusted, "bits": d.bits}))
                    .collect();
                return output::json(&v);
            }
            if list.is_empty() {
                println!("no trusted destinations on token `{}`", ctx.token);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    vec![
                        d.name.clone(),
                        format!("RSA-{}", d.bits),
                        if d.trusted { "yes" } else { "no" }.into(),
                    ]
                })
                .collect();
            output::table(&["NAME", "KEY", "TRUSTED"], &rows);
            Ok(())
        }
        DestinationCmd::Add {
            name,
            public_key,
            so_pin_file,
        } => add_destination(g, &name, &public_key, so_pin_file.as_deref()),
    }
}

fn so_pin(file: Option<&Path>) -> R<RawAuthPin> {
    if let Some(f) = file {
        let mut text = std::fs::read(f).map_err(|e| {
            CliError::new(format!("cannot read the SO PIN file {}: {e}", f.display()))
        })?;
        while matches!(text.last(), Some(b'\n' | b'\r')) {
            text.pop();
        }
        return Ok(RawAuthPin::new(Box::new(text)));
    }
    if let Some(p) = std::env::var_os("CMKP11_SO_PIN").filter(|p| !p.is_empty()) {
        use std::os::unix::ffi::OsStringExt;
        return Ok(RawAuthPin::new(Box::new(p.into_vec())));
    }
    fail("no SO PIN: pass --so-pin-file FILE or set CMKP11_SO_PIN")
}

fn add_destination(g: &Global, name: &str, public_key: &Path, so_pin_file: Option<&Path>) -> R<()> {
    let pem = std::fs::read(public_key)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", public_key.display())))?;
    let (n, e) = rsa_public(&pem).map_err(|why| {
        CliError::new(format!(
            "{} is not an RSA public key in PEM (SubjectPublicKeyInfo): {why}",
            public_key.display()
        ))
    })?;
    let lib = open_library(crate::ctx::load_config()?, g.verbose)?;
    let (slot, token) = pick_token(&lib, g.token.as_deref())?;
    let pin = so_pin(so_pin_file)?;
    let result = (|| {
        let h = lib.open_session(slot, true)?;
        let s = lib.session(h)?;
        let mut s = s.lock();
        lib.login(&mut s, UserType::So, Some(&pin))?;
        let r = lib.add_destination(&s, name, &n, &e);
        let _ = lib.logout(&mut s);
        r
    })();
    lib.close();
    result.map_err(|e| {
        CliError::new(match e.rv() {
            CKR_PIN_INCORRECT => format!("the SO PIN is incorrect for token `{token}`"),
            CKR_ATTRIBUTE_VALUE_INVALID => {
                format!("token `{token}`: a destination named `{name}` exists already")
            }
            CKR_KEY_SIZE_RANGE => format!(
                "token `{token}`: the destination key is shorter than RSA-2048; use the \
                 destination's RSA-3072 import key"
            ),
            _ => format!(
                "token `{token}`: add destination `{name}`: {}",
                describe(&e)
            ),
        })
    })?;
    if g.json {
        return output::json(&serde_json::json!({"destination": name, "trusted": true}));
    }
    println!(
        "registered trusted destination `{name}` (RSA-{}) on token `{token}`: exportable keys \
         can now be exported to it with `cmkp11 key export KEY --to {name}`",
        n.len() * 8
    );
    Ok(())
}

/// The modulus and public exponent of an RSA public key in PEM (SubjectPublicKeyInfo).
fn rsa_public(pem: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    use der::Decode;
    #[derive(der::Sequence)]
    struct RsaPublicKey<'a> {
        modulus: der::asn1::UintRef<'a>,
        public_exponent: der::asn1::UintRef<'a>,
    }
    let (label, der) = der::pem::decode_vec(pem).map_err(|e| e.to_string())?;
    if label != "PUBLIC KEY" {
        return Err(format!("PEM label `{label}`, expected `PUBLIC KEY`"));
    }
    let spki = spki::SubjectPublicKeyInfoRef::from_der(&der).map_err(|e| e.to_string())?;
    if spki.algorithm.oid != const_oid::db::rfc5912::RSA_ENCRYPTION {
        return Err(format!(
            "algorithm {} is not rsaEncryption",
            spki.algorithm.oid
        ));
    }
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the key's BIT STRING has unused bits")?;
    let k = RsaPublicKey::from_der(bits).map_err(|e| e.to_string())?;
    Ok((
        k.modulus.as_bytes().to_vec(),
        k.public_exponent.as_bytes().to_vec(),
    ))
}
