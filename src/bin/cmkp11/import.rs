//! Bring your own key: `cmkp11 key import-key create|public` and `cmkp11 key import`.
//!
//! The customer wraps a 32-byte AES key with RSA-OAEP (SHA-256, MGF1-SHA-256) under the
//! public half of an RSA-3072 import key generated in the token (docs/byok.md has the
//! `openssl` commands), and the token unwraps it into a new CMK. Key material is never in
//! this process.

use crate::ctx::{describe, Ctx};
use crate::keyinfo::{check_new_name, key_info, role_or_default, Role};
use crate::{fail, output, CliError, R};
use clap::{Args, Subcommand};
use cmkp11::error::Error;
use cmkp11::keystore::{self, State};
use cmkp11::runtime::session::AttrValue;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki_sys::*;
use std::path::{Path, PathBuf};

/// `cmkp11 key import-key` subcommands.
#[derive(Subcommand, Debug)]
pub enum ImportKeyCmd {
    /// Create an RSA-3072 import key in the token and write its public key (PEM).
    Create {
        /// The import key's name.
        name: String,
        /// Where to write the public key (default: NAME.pem).
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Write the public key of an existing import key (PEM).
    Public {
        /// The import key's name.
        name: String,
        /// Where to write the public key (default: NAME.pem).
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `cmkp11 key import NAME --import-key IMPORTKEY --wrapped FILE`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The new key's name.
    pub name: String,
    /// The import key the AES key was wrapped for.
    #[arg(long, value_name = "IMPORTKEY")]
    pub import_key: String,
    /// The wrapped key (RSA-OAEP SHA-256 ciphertext, raw bytes).
    #[arg(long, value_name = "FILE")]
    pub wrapped: PathBuf,
    /// The new key's role (default: `[keys] default_role`).
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// The hash of the RSA-OAEP wrapping and its MGF1 (sha1 for tokens whose OAEP has no
    /// other, like SoftHSM2 2.6).
    #[arg(long, value_enum, default_value_t = OaepHashArg::Sha256)]
    pub oaep_hash: OaepHashArg,
    /// The length of the wrapped AES key in bits, 128 or 256 (recorded with the key: some
    /// tokens do not report the length of an unwrapped key).
    #[arg(long, default_value_t = 256)]
    pub bits: u64,
}

/// `--oaep-hash`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OaepHashArg {
    /// SHA-256 (default).
    Sha256,
    /// SHA-1.
    Sha1,
}

fn import_disabled(ctx: &Ctx) -> String {
    format!(
        "bring-your-own-key import is disabled on token `{}` by the configuration {}; to \
         enable it, add\n\n[policy]\nallow_import = true\n\nto that file (the module and \
         this command read the same one) and run this command again",
        ctx.token,
        ctx.config_name()
    )
}

fn import_err<'a>(ctx: &'a Ctx, what: &'a str) -> impl Fn(Error) -> CliError + 'a {
    move |e| match e.rv() {
        CKR_ACTION_PROHIBITED => CliError::new(import_disabled(ctx)),
        _ => CliError::new(format!("token `{}`: {what}: {}", ctx.token, describe(&e))),
    }
}

/// Runs a `cmkp11 key import-key` subcommand.
pub fn import_key_cmd(ctx: &Ctx, cmd: ImportKeyCmd) -> R<()> {
    match cmd {
        ImportKeyCmd::Create { name, out } => {
            if !ctx.lib().cfg.policy.allow_import {
                return fail(import_disabled(ctx));
            }
            check_new_name(ctx, &name)?;
            let public = {
                let (lib, mut s) = ctx.parts();
                lib.create_import_key(&mut s, &name)
                    .map_err(import_err(ctx, &format!("create import key `{name}`")))?
                    .0
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
            write_public(ctx, public, &name, &out)?;
            if ctx.g.json {
                let info = key_info(ctx, &ctx.cmk(&name)?)?;
                return output::json(&serde_json::json!({
                    "key": info,
                    "public_key": out,
                }));
            }
            println!(
                "created import key `{name}` (RSA-3072, unwrap only) on token `{}`; its public \
                 key is in {}\nwrap your key with it (docs/byok.md), then run \
                 `cmkp11 key import NEWNAME --import-key {name} --wrapped FILE`",
                ctx.token,
                out.display()
            );
            Ok(())
        }
        ImportKeyCmd::Public { name, out } => {
            let public = find_public(ctx, &name)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.pem")));
            write_public(ctx, public, &name, &out)?;
            if ctx.g.json {
                return output::json(&serde_json::json!({ "public_key": out }));
            }
            println!(
                "wrote the public key of import key `{name}` to {}",
                out.display()
            );
            Ok(())
        }
    }
}

fn find_public(ctx: &Ctx, name: &str) -> R<CK_OBJECT_HANDLE> {
    let (lib, mut s) = ctx.parts();
    let e = |e: Error| {
        CliError::new(format!(
            "token `{}`: find the public key of `{name}`: {}",
            ctx.token,
            describe(&e)
        ))
    };
    lib.find_init(
        &mut s,
        vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(name.as_bytes().to_vec()),
        ],
    )
    .map_err(e)?;
    let found = s.find_next(2).map(<[_]>::to_vec);
    let _ = s.find_final();
    match found.map_err(e)?.as_slice() {
        [h] => Ok(*h),
        [] => fail(format!(
            "no import key named `{name}` on token `{}`; create one with \
             `cmkp11 key import-key create {name}`",
            ctx.token
        )),
        _ => fail(format!(
            "several public keys are named `{name}` on token `{}`",
            ctx.token
        )),
    }
}

fn write_public(ctx: &Ctx, public: CK_OBJECT_HANDLE, name: &str, out: &Path) -> R<()> {
    let v = {
        let (lib, mut s) = ctx.parts();
        lib.get_attributes(&mut s, public, &[CKA_MODULUS, CKA_PUBLIC_EXPONENT])
            .map_err(|e| {
                CliError::new(format!(
                    "token `{}`: read the public key of `{name}`: {}",
                    ctx.token,
                    describe(&e)
                ))
            })?
    };
    let (n, e) = match (&v[0], &v[1]) {
        (
            AttrValue::Value(Attribute::Modulus(n)),
            AttrValue::Value(Attribute::PublicExponent(e)),
        ) => (n.clone(), e.clone()),
        _ => {
            return fail(format!(
                "token `{}`: `{name}` is not an RSA public key",
                ctx.token
            ))
        }
    };
    std::fs::write(out, pem("PUBLIC KEY", &rsa_spki(&n, &e)))
        .map_err(|e| CliError::new(format!("cannot write {}: {e}", out.display())))
}

/// `cmkp11 key import`.
pub fn import(ctx: &Ctx, a: ImportArgs) -> R<()> {
    let t = &ctx.token;
    let ik = ctx.cmk(&a.import_key)?;
    let is_import_key =
        ik.class == CKO_PRIVATE_KEY && key_info(ctx, &ik)?.role.split('+').any(|r| r == "unwrap");
    if !is_import_key {
        return fail(format!(
            "key `{}` on token `{t}` is not an import key; create one with \
             `cmkp11 key import-key create NAME`",
            a.import_key
        ));
    }
    if ik.state(keystore::now()) != State::Enabled {
        return fail(format!(
            "import key `{}` on token `{t}` is {}: it cannot unwrap",
            a.import_key,
            ik.state(keystore::now()).name()
        ));
    }
    let blob = std::fs::read(&a.wrapped)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", a.wrapped.display())))?;
    if blob.is_empty() || blob.len() > 4096 {
        return fail(format!(
            "{} is not a wrapped key ({} bytes; an RSA-3072 OAEP ciphertext is 384 bytes)",
            a.wrapped.display(),
            blob.len()
        ));
    }
    check_new_name(ctx, &a.name)?;
    let role = role_or_default(ctx, a.role);
    let h = ctx.handle_of(&ik)?;
    {
        let (lib, mut s) = ctx.parts();
        let hash = match a.oaep_hash {
            OaepHashArg::Sha256 => cmkp11::runtime::admin::OaepHash::Sha256,
            OaepHashArg::Sha1 => cmkp11::runtime::admin::OaepHash::Sha1,
        };
        lib.import_key_with(
            &mut s,
            h,
            &blob,
            &cmkp11::runtime::admin::ImportSpec {
                name: &a.name,
                role,
                hash,
                key_bytes: a.bits / 8,
            },
        )
        .map_err(|e| match e.rv() {
            CKR_WRAPPED_KEY_INVALID => CliError::new(format!(
                "token `{t}`: {} does not unwrap under import key `{}`: wrap a 16- or 32-byte \
                 key with that import key's public key using RSA-OAEP with the hash given \
                 by --oaep-hash (default SHA-256) for both OAEP and MGF1 (docs/byok.md)",
                a.wrapped.display(),
                a.import_key
            )),
            // The parameters are fixed (SHA-256, MGF1-SHA-256, no label) and checked
            // before the blob: these codes mean the token lacks that OAEP variant.
            CKR_ARGUMENTS_BAD | CKR_MECHANISM_PARAM_INVALID | CKR_MECHANISM_INVALID => {
                CliError::new(format!(
                    "token `{t}` cannot unwrap with this RSA-OAEP hash ({}); SoftHSM2 2.6 \
                     implements OAEP with SHA-1 only: wrap with rsa_oaep_md:sha1 and \
                     rsa_mgf1_md:sha1 and import with --oaep-hash sha1",
                    describe(&e)
                ))
            }
            _ => import_err(ctx, &format!("import key `{}`", a.name))(e),
        })?;
    }
    let info = key_info(ctx, &ctx.cmk(&a.name)?)?;
    if ctx.g.json {
        return output::json(&info);
    }
    println!(
        "imported key `{}` on token `{t}` ({}, role {}, origin imported); the import key `{}` \
         can now be deleted with `cmkp11 key schedule-deletion {}`",
        a.name, info.key_type, info.role, a.import_key, a.import_key
    );
    Ok(())
}

/// DER length octets.
fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// One DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER of a big-endian unsigned value.
fn uint(be: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => &[0],
    };
    let mut v = Vec::with_capacity(trimmed.len() + 1);
    if trimmed[0] & 0x80 != 0 {
        v.push(0);
    }
    v.extend_from_slice(trimmed);
    tlv(0x02, &v)
}

/// DER `SubjectPublicKeyInfo` of an RSA public key (RFC 5280, RFC 8017 A.1.1).
pub fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    // rsaEncryption 1.2.840.113549.1.1.1, parameters NULL
    const ALG: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let rsa_key = tlv(0x30, &[uint(n), uint(e)].concat());
    let mut bits = vec![0u8]; // no unused bits
    bits.extend(rsa_key);
    tlv(0x30, &[&ALG[..], &tlv(0x03, &bits)].concat())
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// PEM armour.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        // RFC 4648 section 10.
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn der_lengths_and_integers() {
        assert_eq!(der_len(5), [5]);
        assert_eq!(der_len(0x80), [0x81, 0x80]);
        assert_eq!(der_len(0x1a2), [0x82, 0x01, 0xa2]);
        assert_eq!(uint(&[0x01, 0x00, 0x01]), [0x02, 0x03, 0x01, 0x00, 0x01]);
        assert_eq!(uint(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(uint(&[0, 0]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn spki_shape() {
        let n = vec![0xc5u8; 384];
        let der = rsa_spki(&n, &[1, 0, 1]);
        // SEQUENCE, long form length (2 bytes), then the algorithm identifier.
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0xa2]);
        assert_eq!(der.len(), 4 + 0x1a2);
        assert_eq!(&der[4..6], &[0x30, 0x0d]);
        let p = pem("PUBLIC KEY", &der);
        assert!(p.starts_with(
            "-----BEGIN PUBLIC KEY-----\nMIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAxcXF"
        ));
        assert!(p.lines().all(|l| l.len() <= 64));
    }
}
