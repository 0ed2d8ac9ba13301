//! What the CLI shows of a key and the choices shared by every command that makes one
//! (`key create`, `key import`, signing keys): roles, the key's facts, new names.

use crate::ctx::{lib_err, Ctx};
use crate::{fail, output, R};
use clap::ValueEnum;
use cmkp11::keystore::{self, Cmk, Origin, State, RESERVED_PREFIX};
use cmkp11::policy::SecretRole;
use cmkp11::runtime::session::AttrValue;
use cmkp11::vendor;
use cryptoki::object::{Attribute, KeyType};
use cryptoki_sys::*;
use serde::Serialize;

/// The role of a secret CMK.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Wraps data keys (AES key wrap): the role `cmkp11 encrypt` needs.
    Wrap,
    /// Encrypts and decrypts data (AES-GCM, AES-CBC-PAD).
    Data,
    /// Computes and verifies MACs (HMAC, CMAC).
    Mac,
}

impl Role {
    /// The library's role.
    pub fn secret_role(self) -> SecretRole {
        match self {
            Role::Wrap => SecretRole::Wrap,
            Role::Data => SecretRole::Data,
            Role::Mac => SecretRole::Mac,
        }
    }
}

/// The role to use: the option, else the configuration's default.
pub fn role_or_default(ctx: &Ctx, role: Option<Role>) -> SecretRole {
    role.map(Role::secret_role)
        .or_else(|| SecretRole::parse(&ctx.lib().cfg.keys.default_role))
        .unwrap_or(SecretRole::Wrap)
}

/// A key as the CLI shows it.
#[derive(Serialize, Debug, Clone)]
pub struct KeyInfo {
    /// Name (label, or hex id).
    pub name: String,
    /// Hex of the stable id.
    pub id: String,
    /// `secret` or `private`.
    pub class: &'static str,
    /// `AES-256`, `RSA-3072`, `EC`...
    pub key_type: String,
    /// `wrap`, `data`, `mac`, or the private roles joined by `+`.
    pub role: String,
    /// `enabled`, `disabled`, `pending-deletion`, `destroyed`.
    pub state: &'static str,
    /// Version numbers, ascending.
    pub versions: Vec<u32>,
    /// The primary version.
    pub primary: u32,
    /// `generated` or `imported`.
    pub origin: &'static str,
    /// Created exportable by an operator (`key create --exportable`): it may leave the
    /// token wrapped under a trusted destination's key.
    pub exportable: bool,
    /// Creation time (RFC 3339), if recorded.
    pub created: Option<String>,
    /// Last rotation (RFC 3339), if any.
    pub rotated: Option<String>,
    /// Last state change (RFC 3339), if any.
    pub updated: Option<String>,
    /// When a key pending deletion is destroyed.
    pub deletion_date: Option<String>,
}

fn ulong(v: &AttrValue) -> Option<CK_ULONG> {
    match v {
        AttrValue::Value(Attribute::VendorDefined((_, b))) => {
            Some(CK_ULONG::from_ne_bytes(b.as_slice().try_into().ok()?))
        }
        AttrValue::Value(Attribute::ValueLen(l)) => Some((*l).into()),
        _ => None,
    }
}

/// Reads what the CLI shows about `cmk`.
pub fn key_info(ctx: &Ctx, cmk: &Cmk) -> R<KeyInfo> {
    let h = ctx.handle_of(cmk)?;
    let (lib, mut s) = ctx.parts();
    let secret = cmk.class == CKO_SECRET_KEY;
    let mut types = vec![
        CKA_KEY_TYPE,
        vendor::CKA_CMKP11_ROLE,
        vendor::CKA_CMKP11_ORIGIN,
    ];
    types.push(if secret { CKA_VALUE_LEN } else { CKA_MODULUS });
    let v = lib
        .get_attributes(&mut s, h, &types)
        .map_err(lib_err(&ctx.token, &format!("read key `{}`", cmk.name())))?;
    let key_type = match (&v[0], &v[3]) {
        (AttrValue::Value(Attribute::KeyType(KeyType::AES)), len) => {
            format!("AES-{}", ulong(len).unwrap_or(0) * 8)
        }
        (AttrValue::Value(Attribute::KeyType(KeyType::RSA)), m) => match m {
            AttrValue::Value(Attribute::Modulus(m)) => format!("RSA-{}", m.len() * 8),
            _ => "RSA".into(),
        },
        (AttrValue::Value(Attribute::KeyType(KeyType::EC)), _) => "EC".into(),
        (AttrValue::Value(Attribute::KeyType(KeyType::EC_EDWARDS)), _) => "EdDSA".into(),
        (AttrValue::Value(Attribute::KeyType(k)), _) => k.to_string(),
        _ => "-".into(),
    };
    let origin = match ulong(&v[2]) {
        Some(o) if o == vendor::CMKP11_ORIGIN_IMPORTED => "imported",
        _ if cmk.record().origin == Origin::Imported => "imported",
        _ => "generated",
    };
    let r = cmk.record();
    let state = cmk.state(keystore::now());
    Ok(KeyInfo {
        name: cmk.name(),
        id: keystore::hex(&cmk.id),
        class: if secret { "secret" } else { "private" },
        key_type,
        role: cmkp11::runtime::admin::role_name(ulong(&v[1]).unwrap_or(0)),
        state: state.name(),
        versions: cmk.versions.iter().map(|(v, _)| *v).collect(),
        primary: cmk.primary().map(|(v, _)| v).unwrap_or(0),
        origin,
        exportable: r.exportable,
        created: output::time(r.created),
        rotated: output::time(r.rotated),
        updated: output::time(r.updated),
        deletion_date: if matches!(state, State::PendingDeletion | State::Destroyed) {
            output::time(r.deletion_date)
        } else {
            None
        },
    })
}

pub fn print_key(ctx: &Ctx, k: &KeyInfo) -> R<()> {
    if ctx.g.json {
        return output::json(k);
    }
    let versions: Vec<String> = k.versions.iter().map(u32::to_string).collect();
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let rows = [
        ("name", k.name.clone()),
        ("token", ctx.token.clone()),
        ("id", k.id.clone()),
        ("state", k.state.to_string()),
        ("class", k.class.to_string()),
        ("type", k.key_type.clone()),
        ("role", k.role.clone()),
        ("origin", k.origin.to_string()),
        (
            "exportable",
            if k.exportable {
                "yes (to trusted destinations only)".to_string()
            } else {
                "no".to_string()
            },
        ),
        ("versions", versions.join(", ")),
        ("primary", k.primary.to_string()),
        ("created", dash(&k.created)),
        ("rotated", dash(&k.rotated)),
        ("updated", dash(&k.updated)),
        ("deletion date", dash(&k.deletion_date)),
    ];
    for (f, v) in rows {
        println!("{:<14}{v}", format!("{f}:"));
    }
    Ok(())
}

/// Checks a new key's name against the token's keys (clear messages before the library's
/// own check).
pub fn check_new_name(ctx: &Ctx, name: &str) -> R<()> {
    if name.is_empty() {
        return fail("a key name cannot be empty");
    }
    if name.starts_with(RESERVED_PREFIX) {
        return fail(format!(
            "key names starting with `{RESERVED_PREFIX}` are reserved for cmkp11's own objects"
        ));
    }
    let view = ctx.view();
    if let Some(c) = view.by_name(name) {
        let state = c.state(keystore::now());
        let more = match state {
            State::Destroyed => "; it is destroyed: run `cmkp11 key purge` to free the name",
            State::Enabled | State::Disabled | State::PendingDeletion => "; choose another name",
        };
        return fail(format!(
            "a key named `{name}` exists already on token `{}` ({}){more}",
            ctx.token,
            state.name()
        ));
    }
    Ok(())
}
