//! The operations behind the entry points, as safe Rust: the policy and the keystore are
//! applied here, so the FFI layer only converts pointers and the CLI can use the same
//! paths. Each function runs with the calling session's lock held.

use super::session::{AttrValue, Delivery, Kind, Session};
use super::Library;
use crate::backend::mech::{Mech, Param};
use crate::error::{err, Error, Result};
use crate::keystore::{self, identity, lifecycle, split_id, Cmk, State, View, RESERVED_PREFIX};
use crate::policy::templates::Refused;
use crate::policy::{self, templates, Class, KeyInfo, Op, SecretRole, Usage};
use crate::vendor;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki_sys::*;
use std::sync::Arc;

/// A key resolved for a use: the backend objects to try, in order, and its facts.
pub struct Key {
    /// The objects to use: the primary version first, then (for decryption and unwrap)
    /// the older enabled versions, newest first.
    pub objects: super::session::Keys,
    /// The policy facts.
    pub info: Arc<KeyInfo>,
}

/// An allowed use: the objects to use, the CMK version, and for a CMK the generation of
/// the keystore view the decision was made under.
type Decision = (super::session::Keys, Option<u32>, Option<u64>);

/// [`Library::use_key`]'s key with the rest of its [`Decision`].
type KeyDecision = (Key, Option<u32>, Option<u64>);

fn rv(r: std::result::Result<(), CK_RV>) -> Result<()> {
    r.map_err(Error::Rv)
}

/// `CKA_ID` as applications see it: a version object's id without tag and number.
pub fn presented_id(info: &KeyInfo) -> Vec<u8> {
    presented_id_ref(info).to_vec()
}

/// [`presented_id`], borrowed.
fn presented_id_ref(info: &KeyInfo) -> &[u8] {
    if info.class == CKO_SECRET_KEY && info.token {
        split_id(&info.raw_id).0
    } else {
        &info.raw_id
    }
}

fn reserved(label: &[u8]) -> bool {
    label.starts_with(RESERVED_PREFIX.as_bytes())
}

/// Whether an id carries cmkp11's version tag (anywhere: versions are cmkp11's to number).
fn tagged(id: &[u8]) -> bool {
    id.windows(keystore::VERSION_TAG.len())
        .any(|w| w == keystore::VERSION_TAG)
}

/// The refusal of a template whose `CKA_ID` carries the version tag (every creating
/// template and `C_SetAttributeValue`: only cmkp11 numbers versions).
const TAGGED_ID: Refused = Refused::new(
    CKR_ATTRIBUTE_VALUE_INVALID,
    "CKA_ID carries cmkp11's version tag `#cmkp11v`, which only cmkp11 assigns",
);

/// [`TAGGED_ID`] when a template's `CKA_ID` carries the version tag.
fn tagged_refusal(t: &[Attribute]) -> Option<Refused> {
    t.iter()
        .any(|a| matches!(a, Attribute::Id(i) if tagged(i)))
        .then_some(TAGGED_ID)
}

/// Refuses a template whose `CKA_ID` carries the version tag, with a warn line (for the
/// calls that create no CMK).
fn refuse_tagged_ids(what: &str, t: &[Attribute]) -> Result<()> {
    if tagged_refusal(t).is_some() {
        log::warn!("{what} refused: {}", TAGGED_ID.rule);
        return err(CKR_ATTRIBUTE_VALUE_INVALID);
    }
    Ok(())
}

/// The refusal of a template that enters cmkp11's namespace ([`enters_namespace`]).
const NAMESPACE: Refused = Refused::new(
    CKR_ATTRIBUTE_VALUE_INVALID,
    "a label starting with `cmkp11:` or CKA_APPLICATION `cmkp11` names cmkp11's own objects",
);

/// A refusal on the short way (a session DEK: no audit record), with its warn line.
#[cold]
#[inline(never)]
fn short_refused(func: &str, r: Refused) -> Error {
    log::warn!("{func} refused: {}", r.rule);
    Error::Rv(r.rv)
}

/// A creation that may make a CMK (a token secret key, a private key), as a refusal names
/// it: the PKCS#11 function and audit operation, and what the template asked.
pub(crate) struct Creating<'a> {
    /// `C_GenerateKey`...
    pub func: &'static str,
    /// The audit record's operation (`generate`, `unwrap`, `derive`, `promote`,
    /// `import-plaintext`).
    pub op: &'static str,
    /// Whether the object would be a CMK: its refusal is audited.
    pub cmk: bool,
    /// The label asked.
    pub label: Option<&'a [u8]>,
    /// The id asked.
    pub id: Option<&'a [u8]>,
    /// The mechanism.
    pub mech: Option<CK_MECHANISM_TYPE>,
}

/// The label and id a creation template asks for, kept before the template is consumed so
/// that a refusal can name them.
struct Asked {
    label: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
}

impl Asked {
    fn of(template: &[Attribute]) -> Asked {
        Asked {
            label: label_of(template),
            id: id_of(template),
        }
    }

    /// What `func` (audit operation `op`) with mechanism `mech` is creating.
    fn creating(
        &self,
        func: &'static str,
        op: &'static str,
        template: &[Attribute],
        mech: CK_MECHANISM_TYPE,
    ) -> Creating<'_> {
        Creating {
            func,
            op,
            cmk: templates::is_token(template),
            label: self.label.as_deref(),
            id: self.id.as_deref(),
            mech: Some(mech),
        }
    }
}

/// The last `CKA_ID` of a template.
fn id_of(t: &[Attribute]) -> Option<Vec<u8>> {
    t.iter().rev().find_map(|a| match a {
        Attribute::Id(i) => Some(i.clone()),
        _ => None,
    })
}

/// What the token itself enforces on every CMK: private (invisible without the login),
/// not modifiable (no role flip, no rename, even through the token directly) and not
/// copyable (no copy with new attributes). Replaces what the application asked.
///
/// In a copy (`copy`), `CKA_COPYABLE` is left as it is (PKCS#11 lets no copy change it)
/// and so is `CKA_PRIVATE` (SoftHSM2 refuses to change it; the copy checks it is set).
/// The promoted key is still not modifiable, so no copy of it can carry new attributes.
/// `CKA_MODIFIABLE` goes last: a token applies a copy's template in order.
fn seal_cmk(t: &mut Vec<Attribute>, copy: bool) {
    t.retain(|a| {
        !matches!(
            a,
            Attribute::Private(_) | Attribute::Modifiable(_) | Attribute::Copyable(_)
        )
    });
    if !copy {
        t.push(Attribute::Private(true));
        t.push(Attribute::Copyable(false));
    }
    t.push(Attribute::Modifiable(false));
}

/// Whether a template would put an object into cmkp11's namespace (a reserved label, or
/// cmkp11's `CKA_APPLICATION`).
fn enters_namespace(t: &[Attribute]) -> bool {
    t.iter().any(|a| match a {
        Attribute::Label(l) => reserved(l),
        Attribute::Application(v) => v.as_slice() == keystore::APPLICATION.as_bytes(),
        _ => false,
    })
}

/// Whether a backend object is one of cmkp11's own (state records, the audit key and
/// checkpoint, any object in its namespace): a label in the reserved namespace, or a data
/// object of cmkp11's application. Unreadable objects count as internal (fail closed).
pub fn internal_object(b: &cryptoki::session::Session, obj: ObjectHandle) -> bool {
    let Ok(attrs) = b.get_attributes(obj, &[AttributeType::Label, AttributeType::Application])
    else {
        return true;
    };
    attrs.iter().any(|a| match a {
        Attribute::Label(l) => reserved(l),
        Attribute::Application(a) => a.as_slice() == keystore::APPLICATION.as_bytes(),
        _ => false,
    })
}

fn label_of(t: &[Attribute]) -> Option<Vec<u8>> {
    t.iter().rev().find_map(|a| match a {
        Attribute::Label(l) => Some(l.clone()),
        _ => None,
    })
}

fn ulong(t: CK_ATTRIBUTE_TYPE, v: CK_ULONG) -> AttrValue {
    AttrValue::Value(Attribute::VendorDefined((
        AttributeType::VendorDefined(t),
        v.to_ne_bytes().to_vec(),
    )))
}

impl Library {
    /// The slot's keystore view, refreshed through `s` when due.
    pub fn view(&self, s: &Session) -> Arc<View> {
        let v = self.stores[s.slot_id as usize]
            .get(&self.backend.ctx, self.backend.slots[s.slot_id as usize]);
        if !v.unverified.is_empty() {
            self.report_unverified(s, &v);
        }
        v
    }

    /// Records in the audit log, once per object and process, each state record that did
    /// not verify (the keystore has logged it at error and its key fails closed).
    #[cold]
    #[inline(never)]
    fn report_unverified(&self, s: &Session, v: &View) {
        static REPORTED: parking_lot::Mutex<std::collections::BTreeSet<(u64, CK_OBJECT_HANDLE)>> =
            parking_lot::const_mutex(std::collections::BTreeSet::new());
        for (obj, key) in &v.unverified {
            if !REPORTED.lock().insert((s.slot_id, obj.handle())) {
                continue;
            }
            let id: Vec<u8> = (0..key.len() / 2)
                .filter_map(|i| u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            let mut rec = crate::audit::Record::new("record-refused", CKR_SIGNATURE_INVALID);
            rec.key = v.cmks.get(&id).map(Cmk::name);
            rec.key_id = Some(id);
            rec.reason = Some(if v.authenticated {
                "a state record of the key does not verify (not written by cmkp11): it is ignored, and the key fails closed (disabled) until an operator sets its state again".into()
            } else {
                "the token's state records were written by an earlier cmkp11 without authentication: the key fails closed until an operator runs `cmkp11 key migrate`".into()
            });
            let _ = self.audit_record(s, rec);
        }
    }

    /// The generation of the slot's view (see [`SlotStore::generation`]).
    ///
    /// [`SlotStore::generation`]: super::store::SlotStore::generation
    pub fn view_generation(&self, s: &Session) -> u64 {
        self.stores[s.slot_id as usize]
            .generation(&self.backend.ctx, self.backend.slots[s.slot_id as usize])
    }

    /// Reloads the slot's view now.
    pub fn reload_view(&self, s: &Session) -> Arc<View> {
        let v = self.stores[s.slot_id as usize]
            .reload(&self.backend.ctx, self.backend.slots[s.slot_id as usize]);
        if !v.unverified.is_empty() {
            self.report_unverified(s, &v);
        }
        v
    }

    /// The CMK an object belongs to, if the keystore knows it.
    fn cmk_of<'v>(&self, view: &'v View, h: CK_OBJECT_HANDLE, info: &KeyInfo) -> Option<&'v Cmk> {
        self.cmk_and_logical(view, h, info).0
    }

    /// [`Library::cmk_of`], and whether `h` is the CMK's logical handle, in one lookup.
    fn cmk_and_logical<'v>(
        &self,
        view: &'v View,
        h: CK_OBJECT_HANDLE,
        info: &KeyInfo,
    ) -> (Option<&'v Cmk>, bool) {
        // Session private keys have no lifecycle: they die with their session.
        if !info.token {
            return (None, false);
        }
        self.objects.with_logical_id(h, |logical| match logical {
            Some(id) => (view.cmks.get(id), true),
            None => (
                match split_id(&info.raw_id).0 {
                    [] => {
                        identity(&info.raw_id, &info.label).and_then(|(id, _)| view.cmks.get(&id))
                    }
                    id => view.cmks.get(id),
                },
                false,
            ),
        })
    }

    /// Resolves a key for `op` with mechanism `mech`: handle, policy, lifecycle state,
    /// access rules. Refusals are logged with their reason.
    pub fn use_key(
        &self,
        s: &Session,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
        op: Op,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<Key> {
        match self.use_key_with(s, h, invalid, op, mech) {
            Ok((k, _, _)) => Ok(k),
            // Only `crypto_decide` decides again after an automatic rotation.
            Err(Error::Rv(super::gcm_limit::DECIDE_AGAIN)) => err(CKR_FUNCTION_FAILED),
            Err(e) => Err(e),
        }
    }

    /// [`Library::use_key`], also returning the version used and, for a CMK, the
    /// generation of the keystore view the decision was made under.
    fn use_key_with(
        &self,
        s: &Session,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
        op: Op,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<KeyDecision> {
        let (obj, info) = s.key_info(self, h, invalid)?;
        match self.decide(s, h, obj, &info, op, mech) {
            Ok((objects, version, view)) => {
                self.gcm_gate(s, op, mech, &info, objects.first().copied())?;
                self.audit_use(s, op, mech, &info, version)?;
                Ok((Key { objects, info }, version, view))
            }
            Err((rv, reason)) => {
                log::info!("refused {} with `{}`: {reason}", op.name(), info.label);
                let _ = self.audit_key(s, op.name(), Some(mech), &info, None, rv, Some(reason));
                err(rv)
            }
        }
    }

    /// Records an allowed use: an audit record for a CMK (a use that cannot be recorded is
    /// refused under `audit.on_failure = deny`), a count for a DEK.
    fn audit_use(
        &self,
        s: &Session,
        op: Op,
        mech: CK_MECHANISM_TYPE,
        info: &KeyInfo,
        version: Option<u32>,
    ) -> Result<()> {
        // Checked here, inline: without an audit log a use records nothing.
        if !self.audit.enabled() {
            return Ok(());
        }
        if info.class() == Class::Cmk {
            self.audit_key(s, op.name(), Some(mech), info, version, CKR_OK, None)
        } else {
            self.audit.count_bulk(s.handle, op.name());
            Ok(())
        }
    }

    /// [`Library::use_key`] for a cryptographic `*Init` or `C_UnwrapKey`, reusing the
    /// session's last decision when it is still valid (see [`super::session::Decided`]),
    /// else remembering the new one when it may be reused (no access rules: those depend
    /// on the time of day). Out of line: the repeated `*Init` of the hot path checks
    /// [`Library::reusable`] itself and comes here only for a new decision.
    #[inline(never)]
    fn use_key_cached(
        &self,
        s: &mut Session,
        h: CK_OBJECT_HANDLE,
        invalid: CK_RV,
        op: Op,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<super::session::Keys> {
        if let Some(d) = self.reusable(s, h, op, mech) {
            self.gcm_gate(s, op, mech, &d.info, d.objects.first().copied())?;
            self.audit_use(s, op, mech, &d.info, d.version)?;
            return Ok(super::session::Keys::from_slice(&d.objects));
        }
        // Access rules depend on the time of day, rate limits on every use: decided anew.
        let remember = self.cfg.access.is_empty() && self.cfg.rate_limit.is_empty();
        if remember && s.decided.as_ref().is_none_or(|d| d.key != h) {
            // Before the epoch is read: a change to the key's entry from now on voids it.
            self.objects.mark_decided(h);
        }
        let epoch = self.objects.epoch();
        let (key, version, view) = self.use_key_with(s, h, invalid, op, mech)?;
        if remember {
            s.decided = Some(super::session::Decided {
                key: h,
                op,
                mech,
                epoch,
                view_generation: view,
                objects: key.objects.clone(),
                version,
                info: key.info,
            });
        }
        Ok(key.objects)
    }

    /// The session's remembered decision, if it holds for this use of `h`: same key,
    /// operation and mechanism, and nothing it rests on changed since.
    #[inline]
    fn reusable<'s>(
        &self,
        s: &'s Session,
        h: CK_OBJECT_HANDLE,
        op: Op,
        mech: CK_MECHANISM_TYPE,
    ) -> Option<&'s super::session::Decided> {
        let d = s.decided.as_ref()?;
        let holds = d.key == h
            && d.op == op
            && d.mech == mech
            && d.epoch == self.objects.epoch()
            && d.view_generation
                .is_none_or(|g| g == self.view_generation(s));
        holds.then_some(d)
    }

    /// The decision behind [`Library::use_key`]: the objects to use and the version of
    /// the first, or the refusal and its reason.
    fn decide(
        &self,
        s: &Session,
        h: CK_OBJECT_HANDLE,
        obj: ObjectHandle,
        info: &KeyInfo,
        op: Op,
        mech: CK_MECHANISM_TYPE,
    ) -> std::result::Result<Decision, (CK_RV, String)> {
        policy::check_use(op, mech, info, &self.settings)
            .map_err(|rv| (rv, format!("policy: {}", crate::backend::rv::name(rv))))?;
        if info.class() != Class::Cmk {
            return Ok((smallvec::smallvec![obj], None, None));
        }
        let (generation, view) = self.stores[s.slot_id as usize]
            .get_with_generation(&self.backend.ctx, self.backend.slots[s.slot_id as usize]);
        let mut objects: super::session::Keys = smallvec::smallvec![obj];
        let mut version = Some(split_id(&info.raw_id).1.unwrap_or(1));
        let (cmk, logical) = self.cmk_and_logical(&view, h, info);
        if info.token {
            // Fail closed: a token key is used only as a verified version of a CMK whose
            // state the keystore could read (never "no record, so enabled").
            if !view.logged_in {
                return Err((
                    CKR_USER_NOT_LOGGED_IN,
                    "the key's lifecycle state cannot be read without the user's login".into(),
                ));
            }
            let known = cmk.is_some_and(|c| logical || c.versions.iter().any(|(_, o)| *o == obj));
            if !known || !info.label_exact {
                return Err((
                    CKR_KEY_FUNCTION_NOT_PERMITTED,
                    "the object is no verified version of a CMK of this token (made around cmkp11, or its facts do not hold)".into(),
                ));
            }
        }
        if let Some(cmk) = cmk {
            let state = cmk.state(keystore::now());
            if state != State::Enabled {
                return Err((
                    CKR_KEY_FUNCTION_NOT_PERMITTED,
                    format!("the key is {}", state.name()),
                ));
            }
            let primary = cmk.primary();
            if logical || primary.map(|(_, o)| o) == Some(obj) {
                // Only unwrap and AES-GCM decryption try older versions.
                let all = op == Op::Unwrap || (op == Op::Decrypt && mech == CKM_AES_GCM);
                objects = if all {
                    cmk.versions.iter().rev().map(|(_, o)| *o).collect()
                } else {
                    primary
                        .map(|(_, o)| smallvec::smallvec![o])
                        .unwrap_or(objects)
                };
                version = primary.map(|(v, _)| v);
            } else if !matches!(op, Op::Decrypt | Op::Unwrap | Op::Verify) {
                // An older version only opens what it closed.
                return Err((
                    CKR_KEY_FUNCTION_NOT_PERMITTED,
                    "an older version only decrypts".into(),
                ));
            }
        }
        if !self.cfg.access.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| ((d.as_secs() % 86_400) / 60) as u32)
                .unwrap_or(0);
            // In the daemon, the application's kernel-attested identity; else this process's.
            let peer = crate::sys::peer::current().map(|p| policy::access::Caller {
                uid: p.uid,
                exe: p.exe.clone(),
            });
            let caller = peer.as_ref().unwrap_or(&self.caller);
            policy::access::check(&self.cfg.access, &info.label, op.name(), caller, now)
                .map_err(|reason| (policy::access::DENIED, reason))?;
        }
        if !self.cfg.rate_limit.is_empty() {
            // Counted last: a use another rule refuses costs nothing.
            let uid = crate::sys::peer::current().map_or(self.caller.uid, |p| p.uid);
            self.rate
                .check(
                    &self.cfg.rate_limit,
                    &info.label,
                    op.name(),
                    uid,
                    std::time::Instant::now(),
                )
                .map_err(|reason| {
                    log::warn!("refused {} with `{}`: {reason}", op.name(), info.label);
                    (policy::rate::REFUSED, reason)
                })?;
        }
        Ok((objects, version, Some(generation)))
    }

    /// Writes an audit record about a key (a no-op when the audit log is off).
    #[allow(clippy::too_many_arguments)]
    pub fn audit_key(
        &self,
        s: &Session,
        op: &str,
        mech: Option<CK_MECHANISM_TYPE>,
        info: &KeyInfo,
        version: Option<u32>,
        result: CK_RV,
        reason: Option<String>,
    ) -> Result<()> {
        if !self.audit.enabled() {
            return Ok(());
        }
        // Borrowed values only: no allocation per CMK use.
        let r = crate::audit::RecordRef {
            op,
            mechanism: mech,
            key: Some(&info.label),
            key_id: Some(presented_id_ref(info)),
            version,
            result,
            reason: reason.as_deref(),
            slot: Some(s.slot_id),
            token: self
                .token_labels
                .get(s.slot_id as usize)
                .map(String::as_str),
            session: Some(s.handle),
        };
        self.audit.record_ref(&r).map_err(Error::Rv)
    }

    /// Records the intent of lifecycle step `op` about a key before the step is made:
    /// under `on_failure = "deny"` a step whose record cannot be written must not happen,
    /// so a failure here is [`Error::Audit`] and the caller stops (see
    /// [`crate::audit::Auditor::intent`]).
    pub fn audit_intent(
        &self,
        s: &Session,
        op: &str,
        key: Option<&str>,
        key_id: Option<&[u8]>,
        mech: Option<CK_MECHANISM_TYPE>,
    ) -> Result<()> {
        self.operator_gate(s, op, key, key_id, mech)?;
        self.policy_intent(s, op, key, key_id, mech)
    }

    /// The `intent` record of a lifecycle step cmkp11 takes by its own policy, whoever's
    /// call triggered it (the rotation at the AES-GCM invocation limit): no
    /// [`Library::operator_gate`], since no caller asked for the step.
    pub fn policy_intent(
        &self,
        s: &Session,
        op: &str,
        key: Option<&str>,
        key_id: Option<&[u8]>,
        mech: Option<CK_MECHANISM_TYPE>,
    ) -> Result<()> {
        if !self.audit.enabled() {
            return Ok(());
        }
        let r = crate::audit::RecordRef {
            op,
            mechanism: mech,
            key,
            key_id,
            slot: Some(s.slot_id),
            token: self
                .token_labels
                .get(s.slot_id as usize)
                .map(String::as_str),
            session: Some(s.handle),
            ..crate::audit::RecordRef::default()
        };
        self.audit.intent(&r).map_err(|why| {
            log::error!(
                "{op} of `{}` refused: the audit log cannot be written ({why}) and \
                 on_failure = \"deny\"",
                key.unwrap_or("-")
            );
            Error::Audit(why)
        })
    }

    /// Service mode: a lifecycle step (every step writes its intent record first, so this
    /// is called from [`Library::audit_intent`], the one door they all pass) asked for by
    /// an application is refused with `CKR_USER_NOT_LOGGED_IN`: the user it needs, an
    /// operator of the daemon's admin socket, is not the one logged in (docs/operators.md).
    /// The refusal is an audit record and a warn line. `[service]
    /// applications_create_keys = true` lets applications create new CMKs (and nothing
    /// else). Library mode, the daemon itself and its operators pass.
    pub fn operator_gate(
        &self,
        s: &Session,
        op: &str,
        key: Option<&str>,
        key_id: Option<&[u8]>,
        mech: Option<CK_MECHANISM_TYPE>,
    ) -> Result<()> {
        if !crate::sys::peer::is_application() {
            return Ok(());
        }
        let creates = matches!(op, "generate" | "promote" | "import-plaintext");
        if creates
            && self
                .cfg
                .service
                .as_ref()
                .is_some_and(|svc| svc.applications_create_keys)
        {
            return Ok(());
        }
        let reason = format!(
            "service mode: {op} is an operator action (the daemon's admin socket); \
             applications cannot change a CMK's lifecycle"
        );
        if let Some(p) = crate::sys::peer::current() {
            log::warn!(
                "{op} of `{}` refused to application pid {} uid {} ({}): {reason}",
                key.unwrap_or("-"),
                p.pid,
                p.uid,
                p.exe.display()
            );
        }
        let r = crate::audit::RecordRef {
            op,
            mechanism: mech,
            key,
            key_id,
            result: CKR_USER_NOT_LOGGED_IN,
            reason: Some(&reason),
            slot: Some(s.slot_id),
            token: self
                .token_labels
                .get(s.slot_id as usize)
                .map(String::as_str),
            session: Some(s.handle),
            ..crate::audit::RecordRef::default()
        };
        if let Err(n) = self.audit.record_ref(&r) {
            log::error!("audit: refusal record not written ({n})");
        }
        err(CKR_USER_NOT_LOGGED_IN)
    }

    /// Writes an audit record, with the session's slot, token and handle filled in.
    pub fn audit_record(&self, s: &Session, mut r: crate::audit::Record) -> Result<()> {
        if !self.audit.enabled() {
            return Ok(());
        }
        r.slot = Some(s.slot_id);
        r.token = self.token_labels.get(s.slot_id as usize).cloned();
        r.session = Some(s.handle);
        self.audit.record(r).map_err(Error::Rv)
    }

    /// `C_*Init` for the runtime's own callers (the CLI): the decision, then the operation
    /// made ready in the session (the backend is told at the first data call).
    pub fn crypto_init(
        &self,
        s: &mut Session,
        kind: Kind,
        mut mech: Mech,
        key: CK_OBJECT_HANDLE,
    ) -> Result<()> {
        let keys = self.crypto_decide(s, kind, mech.ty, key)?;
        self.probe_if_needed(s, kind, &mut mech, &keys)?;
        s.init(kind, mech, keys)
    }

    /// The decision of a `C_*Init` with mechanism `ty`: the backend objects to use, the
    /// first one first. It needs only the mechanism's type (what a mechanism's
    /// parameters may be was checked when they were read; what the backend accepts of
    /// them is [`Library::probe_if_needed`]).
    pub fn crypto_decide(
        &self,
        s: &mut Session,
        kind: Kind,
        ty: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<super::session::Keys> {
        match self.crypto_decide_once(s, kind, ty, key) {
            // The AES-GCM limit of the key's version was reached and the key rotated:
            // decided again, with the new version (see `gcm_limit`).
            Err(Error::Rv(super::gcm_limit::DECIDE_AGAIN)) => {
                s.decided = None;
                match self.crypto_decide_once(s, kind, ty, key) {
                    Err(Error::Rv(super::gcm_limit::DECIDE_AGAIN)) => err(CKR_FUNCTION_FAILED),
                    r => r,
                }
            }
            r => r,
        }
    }

    fn crypto_decide_once(
        &self,
        s: &mut Session,
        kind: Kind,
        ty: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<super::session::Keys> {
        if s.active(kind) {
            return err(CKR_OPERATION_ACTIVE);
        }
        self.require_mechanism(s.slot_id, ty)?;
        let op = match kind {
            Kind::Encrypt => Op::Encrypt,
            Kind::Decrypt => Op::Decrypt,
            Kind::Sign => Op::Sign,
            Kind::Verify => Op::Verify,
            Kind::Digest => {
                if !policy::mechanisms::is_digest(ty) {
                    return err(CKR_MECHANISM_INVALID);
                }
                return Ok(Default::default());
            }
        };
        // Only authenticated decryption may try older versions (and only single-part).
        let all = kind == Kind::Decrypt && ty == CKM_AES_GCM;
        let keys = match self.reusable(s, key, op, ty) {
            // The hot path: a repeated `*Init`, in a few instructions.
            Some(d) => {
                self.gcm_gate(s, op, ty, &d.info, d.objects.first().copied())?;
                self.audit_use(s, op, ty, &d.info, d.version)?;
                match d.objects.as_slice() {
                    // One object to use (a key of one version, or a use that takes only
                    // the primary): no copy of the list.
                    [one, ..] if !all || d.objects.len() == 1 => smallvec::smallvec![*one],
                    _ => super::session::Keys::from_slice(&d.objects),
                }
            }
            None => {
                let mut k = self.use_key_cached(s, key, CKR_KEY_HANDLE_INVALID, op, ty)?;
                if !all {
                    k.truncate(1);
                }
                k
            }
        };
        Ok(keys)
    }

    /// Whether cmkp11 writes the IV of this `C_EncryptInit` itself, and how long it is:
    /// AES-GCM (12 bytes) and AES-CBC(-PAD) (16 bytes) under a CMK that the access rules
    /// let this process encrypt with but not decrypt with. An application choosing the IV
    /// could otherwise turn encryption into decryption (GCM: the keystream of a victim's
    /// IV) or into a plaintext-guess oracle (CBC). A process that may decrypt gains
    /// nothing from a chosen IV and keeps its own. Decided from the key's facts the
    /// `*Init` just read (no backend call); without access rules, one comparison.
    #[inline]
    pub fn module_iv(
        &self,
        s: &Session,
        kind: Kind,
        ty: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Option<usize> {
        if kind != Kind::Encrypt
            || self.cfg.access.is_empty()
            || !matches!(ty, CKM_AES_GCM | CKM_AES_CBC | CKM_AES_CBC_PAD)
        {
            return None;
        }
        let info = match s.decided.as_ref() {
            Some(d) if d.key == key => d.info.clone(),
            _ => self.objects.info(key)?,
        };
        if info.class() != Class::Cmk || !self.encrypt_only(&info) {
            return None;
        }
        Some(if ty == CKM_AES_GCM { 12 } else { 16 })
    }

    /// Whether the access rules let this process encrypt with a key and not decrypt.
    #[inline(never)]
    fn encrypt_only(&self, info: &KeyInfo) -> bool {
        if self.cfg.access.is_empty() {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| ((d.as_secs() % 86_400) / 60) as u32)
            .unwrap_or(0);
        let may = |op: &str| {
            policy::access::check(&self.cfg.access, &info.label, op, &self.caller, now).is_ok()
        };
        may("encrypt") && !may("decrypt")
    }

    /// Fills `iv` with an IV of cmkp11's (see [`Library::module_iv`]): AES-GCM's from the
    /// library's counter source, AES-CBC's from the token's random generator.
    pub fn fill_iv(&self, s: &Session, iv: &mut [u8]) -> Result<()> {
        if iv.len() == 12 {
            iv.copy_from_slice(&self.ivs.next());
            Ok(())
        } else {
            Ok(s.backend().generate_random_slice(iv)?)
        }
    }

    /// Asks the backend, once per slot, operation and parameter values, whether it
    /// accepts a mechanism whose parameters only it can judge (an OAEP or PSS hash, an
    /// EdDSA variant), in a session of its own, at `*Init` where the specification puts
    /// the refusal.
    pub fn probe_if_needed(
        &self,
        s: &Session,
        kind: Kind,
        mech: &mut Mech,
        keys: &[ObjectHandle],
    ) -> Result<()> {
        if crate::backend::mech::needs_probe(mech) {
            self.probe_once(s.slot_id, kind, mech, keys)?;
        }
        Ok(())
    }

    /// [`Library::probe`] unless the same parameters were accepted before.
    #[inline(never)]
    fn probe_once(
        &self,
        slot: CK_SLOT_ID,
        kind: Kind,
        mech: &mut Mech,
        keys: &[ObjectHandle],
    ) -> Result<()> {
        let probed = (slot, kind as u8, mech.clone());
        if !self.probed.read().contains(&probed) {
            let key = keys.first().copied().ok_or(Error::Rv(CKR_GENERAL_ERROR))?;
            self.probe(slot, kind, mech, key)?;
            self.probed.write().insert(probed);
        }
        Ok(())
    }

    /// Asks the backend whether it accepts `mech` with `key` for `kind`, in a session of
    /// its own that is closed right after (closing ends the backend operation). The
    /// deferred backend init would otherwise report a refused parameter value (an OAEP
    /// or PSS hash the token lacks) only at the data call; this returns it at `*Init`,
    /// where the specification puts it. Accepted parameters are remembered.
    fn probe(
        &self,
        slot: CK_SLOT_ID,
        kind: Kind,
        mech: &mut Mech,
        key: ObjectHandle,
    ) -> Result<()> {
        let b = self.backend.ctx.open_ro_session(self.slot(slot)?)?;
        if kind == Kind::Digest {
            return Ok(());
        }
        let raw = crate::backend::raw::get().ok_or(Error::Rv(CKR_CRYPTOKI_NOT_INITIALIZED))?;
        match raw.init(kind, b.handle(), mech, key.handle()) {
            CKR_OK => Ok(()),
            rv => err(rv),
        }
    }

    /// `C_DigestKey`: the backend object of a key that may be digested; secret and
    /// private keys are refused (digesting one is an equality oracle on key material).
    pub fn digestible_key(&self, s: &Session, key: CK_OBJECT_HANDLE) -> Result<ObjectHandle> {
        let (obj, info) = s.key_info(self, key, CKR_KEY_HANDLE_INVALID)?;
        if info.is_protected() {
            return err(CKR_KEY_INDIGESTIBLE);
        }
        Ok(obj)
    }

    /// A refused creation: one warn line naming the function and the rule, and, when the
    /// object would have been a CMK, an audit record of the refusal with its reason (the
    /// operation, the code, the label and id asked, the mechanism). Returns the error the
    /// application gets.
    #[cold]
    #[inline(never)]
    pub(crate) fn refused(&self, s: &Session, c: &Creating, r: Refused) -> Error {
        let reason = format!("{} refused: {}", c.func, r.rule);
        log::warn!("{reason}");
        if c.cmk {
            let mut rec = crate::audit::Record::new(c.op, r.rv);
            rec.mechanism = c.mech;
            rec.key = c.label.map(|l| String::from_utf8_lossy(l).into_owned());
            rec.key_id = c.id.map(<[u8]>::to_vec);
            rec.reason = Some(reason);
            let _ = self.audit_record(s, rec);
        }
        Error::Rv(r.rv)
    }

    /// A policy decision on a creating template, with [`Library::refused`] on refusal.
    fn decided<T>(
        &self,
        s: &Session,
        c: &Creating,
        r: std::result::Result<T, Refused>,
    ) -> Result<T> {
        r.map_err(|r| self.refused(s, c, r))
    }

    /// [`Library::identity_refusal`] of a creation, with [`Library::refused`] on refusal.
    pub(crate) fn check_identity_for(
        &self,
        s: &Session,
        c: &Creating,
        id: Option<&[u8]>,
        label: Option<&[u8]>,
    ) -> Result<()> {
        match self.identity_refusal(s, id, label)? {
            Some(r) => Err(self.refused(s, c, r)),
            None => Ok(()),
        }
    }

    /// The identity checks of a new CMK (see [`Library::identity_refusal`]), refused with a
    /// warn line.
    pub(crate) fn check_new_identity(
        &self,
        s: &Session,
        id: Option<&[u8]>,
        label: Option<&[u8]>,
    ) -> Result<()> {
        match self.identity_refusal(s, id, label)? {
            Some(r) => {
                log::warn!("CMK naming refused: {}", r.rule);
                Err(Error::Rv(r.rv))
            }
            None => Ok(()),
        }
    }

    /// The identity checks of a new CMK: its label (see [`Library::name_refusal`]) and
    /// its id, which must not carry the version tag, must not look like the identity of
    /// a key named by its label, must be at most [`keystore::MAX_ID_LEN`] bytes and must
    /// not be the identity of an existing CMK. `Some` names the rule broken.
    fn identity_refusal(
        &self,
        s: &Session,
        id: Option<&[u8]>,
        label: Option<&[u8]>,
    ) -> Result<Option<Refused>> {
        if let Some(r) = self.name_refusal(s, label)? {
            return Ok(Some(r));
        }
        let Some(id) = id else {
            return Ok(None);
        };
        if id.is_empty()
            || id.len() > keystore::MAX_ID_LEN
            || tagged(id)
            || id.starts_with(keystore::LABEL_IDENTITY)
            || id.starts_with(keystore::PROVISIONAL_ID)
        {
            return Ok(Some(Refused::text(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!(
                    "a CMK's CKA_ID is 1 to {} bytes, without cmkp11's version tag `#cmkp11v` or the prefixes `label:` and `cmkp11-new:`; the template's is not",
                    keystore::MAX_ID_LEN
                ),
            )));
        }
        let view = self.reload_view(s);
        if view
            .cmks
            .get(id)
            .is_some_and(|c| c.state(keystore::now()) != State::Destroyed)
        {
            return Ok(Some(Refused::text(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!(
                    "a CMK's CKA_ID is its identity, and a CMK with id {} exists already",
                    keystore::hex(id)
                ),
            )));
        }
        Ok(None)
    }

    /// The label checks of a new CMK: valid UTF-8 (a name is exact, never a lossy copy),
    /// outside cmkp11's namespace, and unique among the token's CMKs. `Some` names the
    /// rule broken.
    fn name_refusal(&self, s: &Session, label: Option<&[u8]>) -> Result<Option<Refused>> {
        let Some(label) = label.filter(|l| !l.is_empty()) else {
            return Ok(None);
        };
        if reserved(label) {
            return Ok(Some(NAMESPACE));
        }
        let Ok(name) = std::str::from_utf8(label) else {
            return Ok(Some(Refused::new(
                CKR_ATTRIBUTE_VALUE_INVALID,
                "a CMK's CKA_LABEL is exact text (valid UTF-8); the template's is not",
            )));
        };
        // Ask the token for keys with that label first: the full keystore is read only
        // when some exist (they may be destroyed keys that no longer count).
        let mut clash = false;
        for class in [
            cryptoki::object::ObjectClass::SECRET_KEY,
            cryptoki::object::ObjectClass::PRIVATE_KEY,
        ] {
            let t = [
                Attribute::Token(true),
                Attribute::Class(class),
                Attribute::Label(label.to_vec()),
            ];
            clash |= self.stores[s.slot_id as usize].with_session(
                &self.backend.ctx,
                self.backend.slots[s.slot_id as usize],
                |b| Ok(!b.find_objects(&t)?.is_empty()),
            )?;
        }
        if !clash {
            return Ok(None);
        }
        let view = self.reload_view(s);
        if view
            .cmks
            .values()
            .any(|c| c.label == name && c.state(keystore::now()) != State::Destroyed)
        {
            return Ok(Some(Refused::text(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!("a CMK's label is unique, and a CMK named `{name}` exists already"),
            )));
        }
        Ok(None)
    }

    /// `C_GenerateKey`. A token key is a CMK: unique name, stable id (given, at most 64
    /// bytes, or 16 random bytes), version 1.
    pub fn generate_key(
        &self,
        s: &mut Session,
        mut mech: Mech,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let asked = Asked::of(&template);
        let c = asked.creating("C_GenerateKey", "generate", &template, mech.ty);
        if !policy::mechanisms::is_generation(mech.ty) || templates::pair_key_type(mech.ty).is_ok()
        {
            let r = Refused::new(
                CKR_MECHANISM_INVALID,
                "not a secret-key generation mechanism",
            );
            return Err(self.refused(s, &c, r));
        }
        if let Some(r) = tagged_refusal(&template) {
            return Err(self.refused(s, &c, r));
        }
        let mut t = self.decided(s, &c, templates::generate_key(template, &self.settings))?;
        let token = templates::is_token(&t);
        let mut cmk_id = None;
        if token {
            let id = match id_of(&t) {
                Some(i) => i,
                None => {
                    let mut i = vec![0u8; 16];
                    s.backend().generate_random_slice(&mut i)?;
                    i
                }
            };
            self.check_identity_for(s, &c, Some(&id), label_of(&t).as_deref())?;
            t.retain(|a| !matches!(a, Attribute::Id(_)));
            t.push(Attribute::Id(keystore::version_id(&id, 1)));
            seal_cmk(&mut t, false);
            let label = label_of(&t).map(|l| String::from_utf8_lossy(&l).into_owned());
            self.audit_intent(s, "generate", label.as_deref(), Some(&id), Some(mech.ty))?;
            cmk_id = Some(id);
        }
        let obj = s.backend().generate_key(&mech.to_cryptoki()?, &t)?;
        Ok(match cmk_id {
            Some(id) => {
                self.record_creation(s, &id, keystore::Origin::Generated, 0);
                let mut rec = crate::audit::Record::new("generate", CKR_OK);
                rec.mechanism = Some(mech.ty);
                rec.key = label_of(&t).map(|l| String::from_utf8_lossy(&l).into_owned());
                rec.key_id = Some(id.clone());
                rec.version = Some(1);
                let _ = self.audit_record(s, rec);
                self.objects.logical(s.slot_id, &id, obj)
            }
            None => s.register_generated(self, obj, true),
        })
    }

    /// Writes a new CMK's first state record (creation time, origin). The key exists
    /// without it (a key with no record is an enabled, generated key), so a failure here
    /// is only logged.
    pub fn record_creation(
        &self,
        s: &Session,
        id: &[u8],
        origin: keystore::Origin,
        value_len: u64,
    ) {
        if s.rw {
            if let Err(e) = self.write_creation_record(s, id, origin, value_len) {
                log::warn!(
                    "cannot record the creation of CMK {}: {e}",
                    keystore::hex(id)
                );
            }
        }
        self.stores[s.slot_id as usize].invalidate();
    }

    /// The first state record of a CMK with identity `id` (its key objects may not exist
    /// yet: an import writes the record first, so that a crash never leaves an imported
    /// key without its origin and length; a record whose key never came is an orphan
    /// that purge removes).
    pub fn write_creation_record(
        &self,
        s: &Session,
        id: &[u8],
        origin: keystore::Origin,
        value_len: u64,
    ) -> Result<()> {
        let cmk = Cmk {
            id: id.to_vec(),
            class: CKO_SECRET_KEY,
            label: String::new(),
            ..Cmk::default()
        };
        let t = keystore::now();
        lifecycle::write_record(s.backend(), &cmk, |r| {
            r.created = t;
            r.origin = origin;
            r.value_len = value_len;
        })
        .map(drop)
    }

    /// `C_GenerateKeyPair`.
    pub fn generate_key_pair(
        &self,
        s: &mut Session,
        mut mech: Mech,
        public: Vec<Attribute>,
        private: Vec<Attribute>,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        let (label0, id0) = (label_of(&private), id_of(&private));
        // A private key is a CMK (in the token or not): every refusal is audited.
        let c = Creating {
            func: "C_GenerateKeyPair",
            op: "generate",
            cmk: true,
            label: label0.as_deref(),
            id: id0.as_deref(),
            mech: Some(mech.ty),
        };
        let key_type = self.decided(s, &c, templates::pair_key_type(mech.ty))?;
        if let Some(r) = tagged_refusal(&public).or_else(|| tagged_refusal(&private)) {
            return Err(self.refused(s, &c, r));
        }
        let mut private = self.decided(s, &c, templates::private_key(private, key_type))?;
        let mut public = public;
        if enters_namespace(&public) || enters_namespace(&private) {
            return Err(self.refused(s, &c, NAMESPACE));
        }
        let token = templates::is_token(&private);
        let mut token_label = None;
        if token {
            let label = label_of(&private).filter(|l| !l.is_empty());
            let id = id_of(&private).filter(|i| !i.is_empty());
            let provisional = id.is_none() && label.is_none();
            if provisional {
                // Every CMK has an identity (its lifecycle hangs on it): a provisional one
                // is assigned, to the public key too when it has none, so that the pair
                // still matches. The application may name the key once (NSS sets CKA_ID
                // right after generating), so the token cannot be told to refuse every
                // change: such a key is private and not copyable, but stays modifiable.
                let mut i = vec![0u8; 16];
                s.backend().generate_random_slice(&mut i)?;
                let i = [keystore::PROVISIONAL_ID, &i].concat();
                private.retain(|a| !matches!(a, Attribute::Id(_)));
                private.push(Attribute::Id(i.clone()));
                if id_of(&public).is_none() {
                    public.push(Attribute::Id(i));
                }
            }
            self.check_identity_for(s, &c, id.as_deref(), label.as_deref())?;
            seal_cmk(&mut private, false);
            if provisional {
                private.retain(|a| *a != Attribute::Modifiable(false));
            }
            let text = label.map(|l| String::from_utf8_lossy(&l).into_owned());
            let key_id = id_of(&private);
            self.audit_intent(
                s,
                "generate",
                text.as_deref(),
                key_id.as_deref(),
                Some(mech.ty),
            )?;
            token_label = Some(text);
        }
        let (p, q) = s
            .backend()
            .generate_key_pair(&mech.to_cryptoki()?, &public, &private)?;
        if let Some(label) = token_label {
            self.stores[s.slot_id as usize].invalidate();
            let mut rec = crate::audit::Record::new("generate", CKR_OK);
            rec.mechanism = Some(mech.ty);
            rec.key = label;
            rec.key_id = id_of(&private);
            rec.reason = Some("C_GenerateKeyPair: a token private key".into());
            let _ = self.audit_record(s, rec);
        }
        Ok((
            s.register_generated(self, p, !templates::is_token(&public)),
            s.register_generated(self, q, !token),
        ))
    }

    /// `C_WrapKey`: a DEK under a wrap CMK's primary version.
    pub fn wrap_key(
        &self,
        s: &mut Session,
        mech: Mech,
        wrapping: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        sink: impl FnOnce(&[u8]) -> Delivery,
        raw: Option<&super::session::RawWrap>,
    ) -> Result<()> {
        if let Some(blob) = s.pending_wrap(&mech, wrapping, key) {
            return s.deliver_wrap_pending(mech, wrapping, key, blob, sink);
        }
        self.require_mechanism(s.slot_id, mech.ty)?;
        let w = self.use_key(
            s,
            wrapping,
            CKR_WRAPPING_KEY_HANDLE_INVALID,
            Op::Wrap,
            mech.ty,
        )?;
        let (k, kinfo) = s.key_info(self, key, CKR_KEY_HANDLE_INVALID)?;
        let (_, origin, _) = self.objects.local_facts(key);
        let (byok, known_len) = {
            let view = self.view(s);
            let record = self.cmk_of(&view, wrapping, &w.info).map(Cmk::record);
            (
                record
                    .as_ref()
                    .is_some_and(|r| r.origin == keystore::Origin::Imported),
                record.map_or(0, |r| r.value_len),
            )
        };
        let winfo;
        let w_info = if w.info.value_len == 0 && known_len > 0 {
            winfo = KeyInfo {
                value_len: known_len,
                ..(*w.info).clone()
            };
            &winfo
        } else {
            &*w.info
        };
        rv(policy::check_wrap(
            mech.ty,
            w_info,
            wrapping,
            byok,
            &kinfo,
            origin,
            &self.settings,
        ))
        .inspect_err(|e| log::info!("refused wrap under `{}`: {e}", w.info.label))?;
        s.wrap(mech, (wrapping, w.objects[0]), (key, k), sink, raw)?;
        // A DEK first wrapped by X can from now on be wrapped only by X.
        self.objects.set_origin(key, wrapping);
        Ok(())
    }

    /// `C_UnwrapKey`: the result is always a DEK; every enabled version is tried, newest
    /// first; every failure that depends on the blob is `CKR_WRAPPED_KEY_INVALID`.
    pub fn unwrap_key(
        &self,
        s: &mut Session,
        mut mech: Mech,
        unwrapping: CK_OBJECT_HANDLE,
        blob: &[u8],
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let asked = Asked::of(&template);
        let c = asked.creating("C_UnwrapKey", "unwrap", &template, mech.ty);
        if let Some(r) = tagged_refusal(&template) {
            return Err(self.refused(s, &c, r));
        }
        let u = self.use_unwrapping_key(s, unwrapping, mech.ty)?;
        let t = self.decided(s, &c, templates::unwrapped(template, &self.settings))?;
        let ty = mech.ty;
        let m = mech.to_cryptoki()?;
        let aes = t
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(k) if *k == cryptoki::object::KeyType::AES));
        let len = aes_value_len_from_blob(ty, blob.len(), aes);
        self.unwrap_versions(s, &u, unwrapping, len, |s, obj| {
            s.backend()
                .unwrap_key(&m, obj, blob, &t)
                .map_err(|e| Error::from(e).rv())
        })
    }

    /// The unwrapping key's use (policy, lifecycle, audit), as `C_UnwrapKey` decides it
    /// first.
    fn use_unwrapping_key(
        &self,
        s: &mut Session,
        unwrapping: CK_OBJECT_HANDLE,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<super::session::Keys> {
        self.require_mechanism(s.slot_id, mech)?;
        self.use_key_cached(
            s,
            unwrapping,
            CKR_UNWRAPPING_KEY_HANDLE_INVALID,
            Op::Unwrap,
            mech,
        )
    }

    /// Tries `unwrap` with every enabled version of the unwrapping key, newest first; the
    /// first success is registered as a DEK (of `len` bytes when known); every failure
    /// that depends on the blob is `CKR_WRAPPED_KEY_INVALID`.
    fn unwrap_versions(
        &self,
        s: &mut Session,
        u: &[ObjectHandle],
        unwrapping: CK_OBJECT_HANDLE,
        len: Option<CK_ULONG>,
        mut unwrap: impl FnMut(&Session, ObjectHandle) -> std::result::Result<ObjectHandle, CK_RV>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let mut last = CKR_WRAPPED_KEY_INVALID;
        for obj in u {
            match unwrap(s, *obj) {
                Ok(k) => {
                    // A DEK unwrapped by X can be wrapped only by X (an RSA key never
                    // wraps, so a DEK conjured through RSA-OAEP never leaves the token).
                    return Ok(s.register_dek(self, k, len, unwrapping));
                }
                Err(rv) => {
                    last = crate::backend::rv::unwrap_failure(rv);
                    if last != CKR_WRAPPED_KEY_INVALID {
                        break;
                    }
                }
            }
        }
        err(last)
    }

    /// [`Library::generate_key`] of a session DEK on the short way: the policy reads the
    /// application's attributes as they came ([`templates::dek_raw`]) and `backend` makes
    /// the key with them and the policy's [`templates::Completion`]. `None` (nothing
    /// done) when the mechanism or the template needs the general way.
    pub fn generate_dek_short(
        &self,
        s: &mut Session,
        mech: &Mech,
        t: &[templates::RawAttr],
        backend: impl FnOnce(CK_SESSION_HANDLE, &templates::Completion) -> RawMade,
    ) -> Option<Result<CK_OBJECT_HANDLE>> {
        if !matches!(mech.param, Param::None)
            || !policy::mechanisms::is_generation(mech.ty)
            || templates::pair_key_type(mech.ty).is_ok()
        {
            return None;
        }
        let completion = match templates::dek_raw(t, &self.settings)? {
            Ok(c) => c,
            Err(r) => return Some(Err(short_refused("C_GenerateKey", r))),
        };
        if t.iter().any(|a| a.ty == CKA_ID && tagged(a.value)) {
            return Some(Err(short_refused("C_GenerateKey", TAGGED_ID)));
        }
        Some(match backend(s.backend().handle(), &completion) {
            Ok(obj) => Ok(s.register_generated(self, obj, true)),
            Err(rv) => err(crate::backend::rv::from_backend(rv)),
        })
    }

    /// [`Library::unwrap_key`] on the short way (see [`Library::generate_dek_short`]):
    /// the same decisions in the same order; `backend` unwraps with one version's object.
    pub fn unwrap_dek_short(
        &self,
        s: &mut Session,
        mech: &Mech,
        unwrapping: CK_OBJECT_HANDLE,
        blob_len: usize,
        t: &[templates::RawAttr],
        backend: impl Fn(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, &templates::Completion) -> RawMade,
    ) -> Option<Result<CK_OBJECT_HANDLE>> {
        if !matches!(mech.param, Param::None) {
            return None;
        }
        // Decided first, without side effects, so that `None` leaves everything (the
        // audit record of the key's use included) to the general way.
        let decided = templates::dek_raw(t, &self.settings)?;
        if t.iter().any(|a| a.ty == CKA_ID && tagged(a.value)) {
            return Some(Err(short_refused("C_UnwrapKey", TAGGED_ID)));
        }
        Some((|| {
            let u = self.use_unwrapping_key(s, unwrapping, mech.ty)?;
            let completion = decided.map_err(|r| short_refused("C_UnwrapKey", r))?;
            let aes = t.iter().any(|a| a.ty == CKA_KEY_TYPE);
            let len = aes_value_len_from_blob(mech.ty, blob_len, aes);
            self.unwrap_versions(s, &u, unwrapping, len, |s, obj| {
                backend(s.backend().handle(), obj.handle(), &completion)
                    .map_err(crate::backend::rv::from_backend)
            })
        })())
    }

    /// `C_DeriveKey`: ECDH1 from an EC private key with the derive role only.
    pub fn derive_key(
        &self,
        s: &mut Session,
        mut mech: Mech,
        base: CK_OBJECT_HANDLE,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let asked = Asked::of(&template);
        let c = asked.creating("C_DeriveKey", "derive", &template, mech.ty);
        if let Some(r) = tagged_refusal(&template) {
            return Err(self.refused(s, &c, r));
        }
        let b = self.use_key(s, base, CKR_KEY_HANDLE_INVALID, Op::Derive, mech.ty)?;
        let t = self.decided(s, &c, templates::derived(template, &self.settings))?;
        let k = s
            .backend()
            .derive_key(&mech.to_cryptoki()?, b.objects[0], &t)?;
        Ok(s.register(self, k, true))
    }

    /// `C_CreateObject`: no plaintext key import unless the test switch allows it; no
    /// object in cmkp11's reserved namespace.
    pub fn create_object(&self, s: &mut Session, t: Vec<Attribute>) -> Result<CK_OBJECT_HANDLE> {
        let (label0, id0) = (label_of(&t), id_of(&t));
        let class = templates::class_of(&t);
        let c = Creating {
            func: "C_CreateObject",
            op: "import-plaintext",
            cmk: class == Some(CKO_PRIVATE_KEY)
                || (class == Some(CKO_SECRET_KEY) && templates::is_token(&t)),
            label: label0.as_deref(),
            id: id0.as_deref(),
            mech: None,
        };
        if let Some(r) = tagged_refusal(&t) {
            return Err(self.refused(s, &c, r));
        }
        let mut t = self.decided(s, &c, templates::create(t, &self.settings))?;
        if enters_namespace(&t) {
            return Err(self.refused(s, &c, NAMESPACE));
        }
        let key = matches!(
            templates::class_of(&t),
            Some(CKO_SECRET_KEY | CKO_PRIVATE_KEY)
        );
        if key && templates::is_token(&t) {
            let label = label_of(&t).filter(|l| !l.is_empty());
            let mut id = id_of(&t).filter(|i| !i.is_empty());
            if id.is_none() && label.is_none() {
                let mut i = vec![0u8; 16];
                s.backend().generate_random_slice(&mut i)?;
                t.push(Attribute::Id(i.clone()));
                id = Some(i);
            }
            self.check_identity_for(s, &c, id.as_deref(), label.as_deref())?;
            seal_cmk(&mut t, false);
            let name = label.map(|l| String::from_utf8_lossy(&l).into_owned());
            self.audit_intent(s, "import-plaintext", name.as_deref(), id.as_deref(), None)?;
        }
        let o = s.backend().create_object(&t)?;
        let h = s.register(self, o, !templates::is_token(&t));
        if key {
            self.objects.mark_imported(h);
            self.stores[s.slot_id as usize].invalidate();
        }
        Ok(h)
    }

    /// `C_CopyObject`: only the promotion of a session key to a token CMK.
    pub fn copy_object(
        &self,
        s: &mut Session,
        h: CK_OBJECT_HANDLE,
        t: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE> {
        let (o, info) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID)?;
        let (label0, id0) = (label_of(&t), id_of(&t));
        // A copy of a secret or private key is a promotion to a CMK, or refused: audited.
        let c = Creating {
            func: "C_CopyObject",
            op: "promote",
            cmk: info.is_protected(),
            label: label0.as_deref().or(Some(info.label.as_bytes())),
            id: id0.as_deref(),
            mech: None,
        };
        if enters_namespace(&t) {
            return Err(self.refused(s, &c, NAMESPACE));
        }
        if let Some(r) = tagged_refusal(&t) {
            return Err(self.refused(s, &c, r));
        }
        let mut t = self.decided(s, &c, templates::copy(&info, t))?;
        let token = match t.iter().rev().find_map(|a| match a {
            Attribute::Token(b) => Some(*b),
            _ => None,
        }) {
            Some(b) => b,
            None => info.token,
        };
        let mut promoted = None;
        let mut new_cmk = None;
        if token && info.is_protected() {
            // Only a key born in the token may become a CMK: cmkp11 saw it generated
            // there, and the token says it never left it in the clear. Not a derived,
            // unwrapped or imported key, whose value someone may know.
            if !(self.objects.generated(h) && info.born_in_token()) {
                let which = if info.label.is_empty() {
                    "this key".to_string()
                } else {
                    format!("`{}`", info.label)
                };
                let r = Refused::text(
                    CKR_ACTION_PROHIBITED,
                    format!(
                        "only a session key generated inside the token (CKA_LOCAL, always sensitive, never extractable) can be promoted to a token CMK; {which} was derived, unwrapped or imported"
                    ),
                );
                return Err(self.refused(s, &c, r));
            }
            // A CMK is private; a copy cannot change CKA_PRIVATE on every token (SoftHSM2
            // refuses), so the session key must be private already.
            let private = s
                .backend()
                .get_attributes(o, &[AttributeType::Private])?
                .contains(&Attribute::Private(true));
            if !private || t.contains(&Attribute::Private(false)) {
                let r = Refused::text(
                    CKR_TEMPLATE_INCONSISTENT,
                    format!(
                        "a CMK is always private (CKA_PRIVATE), and `{}` is not",
                        info.label
                    ),
                );
                return Err(self.refused(s, &c, r));
            }
            if label_of(&t).is_none() && !info.label_exact {
                let r = Refused::new(
                    CKR_ATTRIBUTE_VALUE_INVALID,
                    "a CMK's label is valid UTF-8, and the session key's is not",
                );
                return Err(self.refused(s, &c, r));
            }
            let label = label_of(&t).unwrap_or_else(|| info.label.as_bytes().to_vec());
            let label = Some(label).filter(|l| !l.is_empty());
            if info.class == CKO_SECRET_KEY {
                // A fresh identity: the id the template names, or a new one; never the
                // session key's own.
                let id = match id_of(&t).filter(|i| !i.is_empty()) {
                    Some(i) => i,
                    None => {
                        let mut i = vec![0u8; 16];
                        s.backend().generate_random_slice(&mut i)?;
                        i
                    }
                };
                self.check_identity_for(s, &c, Some(&id), label.as_deref())?;
                t.retain(|a| !matches!(a, Attribute::Id(_)));
                t.push(Attribute::Id(keystore::version_id(&id, 1)));
                new_cmk = Some(id);
            } else {
                let id = id_of(&t)
                    .or_else(|| Some(info.raw_id.clone()))
                    .filter(|i| !i.is_empty());
                if tagged(id.as_deref().unwrap_or_default()) {
                    return Err(self.refused(s, &c, TAGGED_ID));
                }
                if id.is_none() && label.is_none() {
                    let mut i = vec![0u8; 16];
                    s.backend().generate_random_slice(&mut i)?;
                    t.push(Attribute::Id(i));
                } else {
                    self.check_identity_for(s, &c, id.as_deref(), label.as_deref())?;
                }
            }
            seal_cmk(&mut t, true);
            let name = label
                .as_ref()
                .map(|l| String::from_utf8_lossy(l).into_owned());
            let key_id = new_cmk.clone().or_else(|| id_of(&t));
            self.audit_intent(s, "promote", name.as_deref(), key_id.as_deref(), None)?;
            if new_cmk.is_none() {
                promoted = Some(label.unwrap_or_default());
            }
        }
        let copy = s.backend().copy_object(o, &t)?;
        if let Some(id) = &new_cmk {
            self.record_creation(s, id, keystore::Origin::Generated, 0);
            let mut rec = crate::audit::Record::new("promote", CKR_OK);
            rec.key = label_of(&t).map(|l| String::from_utf8_lossy(&l).into_owned());
            rec.key_id = Some(id.clone());
            rec.version = Some(1);
            let _ = self.audit_record(s, rec);
            return Ok(self.objects.logical(s.slot_id, id, copy));
        }
        if token {
            self.stores[s.slot_id as usize].invalidate();
        }
        if let Some(label) = promoted {
            let mut rec = crate::audit::Record::new("promote", CKR_OK);
            rec.key = Some(String::from_utf8_lossy(&label).into_owned());
            rec.key_id = id_of(&t);
            rec.reason = Some("C_CopyObject: a session key made a token CMK".into());
            let _ = self.audit_record(s, rec);
        }
        Ok(s.register(self, copy, !token))
    }

    /// `C_DestroyObject`: destroying a CMK schedules its deletion `deletion_window_days`
    /// ahead (the key stays findable, disabled); other objects are destroyed.
    pub fn destroy_object(&self, s: &mut Session, h: CK_OBJECT_HANDLE) -> Result<()> {
        // A session object made through cmkp11 needs no reading first: it is no CMK.
        if let Some(o) = self.objects.session_object(s.slot_id, h) {
            s.backend().destroy_object(o)?;
            self.objects.forget(h);
            return Ok(());
        }
        let (o, info) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID)?;
        if info.class() != Class::Cmk {
            s.backend().destroy_object(o)?;
            self.objects.forget(h);
            return Ok(());
        }
        let view = self.reload_view(s);
        let cmk = self
            .cmk_of(&view, h, &info)
            .ok_or(Error::Rv(CKR_OBJECT_HANDLE_INVALID))?;
        if cmk.state(keystore::now()) == State::PendingDeletion {
            return Ok(());
        }
        self.audit_intent(
            s,
            "schedule-deletion",
            Some(&cmk.name()),
            Some(&cmk.id),
            None,
        )?;
        let result =
            lifecycle::schedule_deletion(s.backend(), cmk, self.cfg.keys.deletion_window_days);
        let rv = result.as_ref().map_or_else(Error::rv, |_| CKR_OK);
        let _ = self.audit_key(
            s,
            "schedule-deletion",
            None,
            &info,
            None,
            rv,
            Some("C_DestroyObject".into()),
        );
        let r = result?;
        log::warn!(
            "CMK `{}` scheduled for deletion at {} (unix time); cancel with `cmkp11 key cancel-deletion`",
            cmk.name(),
            r.deletion_date
        );
        self.stores[s.slot_id as usize].invalidate();
        Ok(())
    }

    /// `C_GetAttributeValue`: the backend's values, with key material withheld, ids as
    /// applications know them, and cmkp11's vendor attributes.
    pub fn get_attributes(
        &self,
        s: &mut Session,
        h: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<AttrValue>> {
        let (mut o, info) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID)?;
        let mine = |t: CK_ATTRIBUTE_TYPE| {
            (vendor::CKA_CMKP11_STATE..=vendor::CKA_CMKP11_ROLE).contains(&t)
        };
        let view = self.view(s);
        let cmk = if info.class() == Class::Cmk {
            self.cmk_of(&view, h, &info)
        } else {
            None
        };
        if self.objects.logical_id(h).is_some() {
            if let Some((_, p)) = cmk.and_then(Cmk::primary) {
                o = p;
            }
        }
        let backend_types: Vec<Option<AttributeType>> = types
            .iter()
            .filter(|t| !mine(**t))
            .map(|t| AttributeType::try_from(*t).ok())
            .collect();
        let mut from_backend = s
            .attributes(o, &backend_types)?
            .into_iter()
            .zip(backend_types);
        let own_version = identity(&info.raw_id, &info.label).map_or(1, |(_, v)| v);
        let mut out = Vec::with_capacity(types.len());
        for t in types {
            if mine(*t) {
                out.push(self.vendor_attribute(*t, h, &info, cmk, own_version));
                continue;
            }
            let Some((mut v, ty)) = from_backend.next() else {
                return err(CKR_GENERAL_ERROR);
            };
            if info.is_protected() && ty.is_some_and(templates::is_secret_value) {
                // Key material of a CMK or DEK is never returned, whatever the backend says.
                v = AttrValue::Sensitive;
            }
            match &mut v {
                AttrValue::Value(Attribute::Id(id)) => *id = presented_id(&info),
                AttrValue::Value(Attribute::ValueLen(l)) if u64::from(*l) == 0 => {
                    let recorded = cmk.map_or(0, |c| c.record().value_len);
                    if let Some(len) = self.objects.value_len(h) {
                        *l = len.into();
                    } else if recorded > 0 {
                        *l = recorded.into();
                    }
                }
                _ => {}
            }
            out.push(v);
        }
        Ok(out)
    }

    fn vendor_attribute(
        &self,
        t: CK_ATTRIBUTE_TYPE,
        h: CK_OBJECT_HANDLE,
        info: &KeyInfo,
        cmk: Option<&Cmk>,
        own: u32,
    ) -> AttrValue {
        if info.class() != Class::Cmk {
            return AttrValue::Invalid;
        }
        let record = cmk.map(Cmk::record);
        let logical = self.objects.logical_id(h).is_some();
        let v = match t {
            vendor::CKA_CMKP11_STATE => match cmk {
                Some(c) => c.state(keystore::now()).vendor(),
                // Unknown (records unreadable, or no verified CMK): never "enabled".
                None => return AttrValue::Sensitive,
            },
            vendor::CKA_CMKP11_VERSION if logical => {
                cmk.and_then(Cmk::primary).map(|(v, _)| v).unwrap_or(own) as CK_ULONG
            }
            vendor::CKA_CMKP11_VERSION => own as CK_ULONG,
            vendor::CKA_CMKP11_VERSION_COUNT => {
                cmk.map(|c| c.versions.len()).unwrap_or(1) as CK_ULONG
            }
            vendor::CKA_CMKP11_DELETION_DATE => record.map(|r| r.deletion_date).unwrap_or(0),
            vendor::CKA_CMKP11_ORIGIN => {
                let imported =
                    record.is_some_and(|r| r.origin == keystore::Origin::Imported) || !info.local;
                if imported {
                    vendor::CMKP11_ORIGIN_IMPORTED
                } else {
                    vendor::CMKP11_ORIGIN_GENERATED
                }
            }
            vendor::CKA_CMKP11_ROLE => role_bits(info),
            _ => return AttrValue::Invalid,
        };
        ulong(t, v)
    }

    /// `C_SetAttributeValue`: names and dates only; a secret CMK's name and id are stable.
    pub fn set_attributes(
        &self,
        s: &mut Session,
        h: CK_OBJECT_HANDLE,
        t: Vec<Attribute>,
    ) -> Result<()> {
        let (o, info) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID)?;
        if info.class() == Class::Cmk
            && t.iter().any(|a| {
                let ty = CK_ATTRIBUTE_TYPE::from(a.attribute_type());
                (vendor::CKA_CMKP11_STATE..=vendor::CKA_CMKP11_ROLE).contains(&ty)
            })
        {
            // An attempt at the lifecycle through the attributes that show it (they are
            // read-only for everyone; from an application in service mode it is also
            // refused and recorded as the operator action it tries to be).
            self.operator_gate(s, "set-lifecycle-attribute", Some(&info.label), None, None)?;
        }
        if enters_namespace(&t) {
            return err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        refuse_tagged_ids("C_SetAttributeValue", &t)?;
        templates::set(&info, &t).map_err(|r| short_refused("C_SetAttributeValue", r))?;
        if info.class() == Class::Cmk && info.token {
            // A CMK's name and id are its identity, fixed at creation (secret and private).
            // One exception: a private key generated without label and id has a
            // provisional id, and may be named once, before its lifecycle has any record.
            let renames = t
                .iter()
                .any(|a| matches!(a, Attribute::Label(_) | Attribute::Id(_)));
            let naming = info.class == CKO_PRIVATE_KEY
                && info.raw_id.starts_with(keystore::PROVISIONAL_ID)
                && self
                    .reload_view(s)
                    .cmks
                    .get(&info.raw_id)
                    .is_none_or(|c| c.record.is_none());
            if renames && naming {
                let label = label_of(&t).filter(|l| *l != info.label.as_bytes());
                let id = id_of(&t);
                self.check_new_identity(s, id.as_deref(), label.as_deref())?;
            } else if renames {
                log::warn!(
                    "C_SetAttributeValue refused: CKA_LABEL and CKA_ID of CMK `{}` are fixed at creation",
                    info.label
                );
                return err(CKR_ATTRIBUTE_READ_ONLY);
            }
        }
        let r = s.backend().update_attributes(o, &t);
        self.objects.set_info(h, None);
        self.stores[s.slot_id as usize].invalidate();
        Ok(r?)
    }

    /// `C_FindObjectsInit`: one handle per CMK (its logical handle) unless the template
    /// asks for a version (`CKA_CMKP11_VERSION`); internal objects and destroyed keys are
    /// never found; `CKA_ID` matches the id applications know.
    pub fn find_init(&self, s: &mut Session, mut t: Vec<Attribute>) -> Result<()> {
        let mut wanted_id = None;
        let mut wanted_version = None;
        let mut impossible = false;
        t.retain(|a| match a {
            Attribute::Id(i) => {
                wanted_id = Some(i.clone());
                false
            }
            Attribute::VendorDefined((AttributeType::VendorDefined(ty), v))
                if *ty == vendor::CKA_CMKP11_VERSION =>
            {
                match <[u8; 8]>::try_from(v.as_slice()) {
                    Ok(b) => wanted_version = Some(u64::from_ne_bytes(b) as u32),
                    Err(_) => impossible = true,
                }
                false
            }
            _ => true,
        });
        let found = if impossible {
            Vec::new()
        } else {
            s.backend().find_objects(&t)?
        };
        let view = self.view(s);
        let now = keystore::now();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for obj in found {
            // cmkp11's own objects never get a handle: an object is vetted before its
            // first handle is made (a handle, once made, could be probed by number).
            let h = match self.objects.known(s.slot_id, obj) {
                Some(h) => h,
                None if internal_object(s.backend(), obj) => continue,
                None => s.register(self, obj, false),
            };
            let Ok((_, info)) = s.key_info(self, h, CKR_OBJECT_HANDLE_INVALID) else {
                continue;
            };
            if wanted_id
                .as_ref()
                .is_some_and(|w| *w != presented_id(&info))
            {
                continue;
            }
            if info.class() != Class::Cmk {
                if wanted_version.is_none() {
                    out.push(h);
                }
                continue;
            }
            let Some((id, version)) = identity(&info.raw_id, &info.label) else {
                if wanted_version.is_none_or(|w| w == 1) {
                    out.push(h);
                }
                continue;
            };
            let cmk = view.cmks.get(&id);
            if cmk.is_some_and(|c| c.state(now) == State::Destroyed) {
                continue;
            }
            // A version object the keystore left out (its value unusable: a write cut
            // short) is not a version.
            if info.class == CKO_SECRET_KEY
                && cmk.is_some_and(|c| c.versions.iter().all(|(_, o)| *o != obj))
            {
                continue;
            }
            match wanted_version {
                Some(w) if w == version => out.push(h),
                Some(_) => {}
                None if info.class == CKO_SECRET_KEY => {
                    if seen.insert(id.clone()) {
                        out.push(self.objects.logical(s.slot_id, &id, obj));
                    }
                }
                None => out.push(h),
            }
        }
        s.set_find(out)
    }

    /// `C_Login`: passed to the token. Keys past their deletion date are never destroyed
    /// here: destruction is an explicit, audited operator step (`cmkp11 key purge`, the
    /// admin interface's `CMKP11_Purge`), so that nothing an application does shortens the
    /// deletion window.
    pub fn login(
        &self,
        s: &mut Session,
        user: cryptoki::session::UserType,
        pin: Option<&cryptoki::types::RawAuthPin>,
    ) -> Result<()> {
        if matches!(user, cryptoki::session::UserType::So) {
            self.before_so_login(s.slot_id);
        }
        let r = match pin {
            Some(p) => s.backend().login_with_raw(user, p),
            None => s.backend().login(user, None),
        };
        let rv = r
            .as_ref()
            .map_or_else(crate::backend::rv::from_cryptoki, |_| CKR_OK);
        let who = match user {
            cryptoki::session::UserType::So => "so",
            cryptoki::session::UserType::ContextSpecific => "context-specific",
            _ => "user",
        };
        let mut rec = crate::audit::Record::new("login", rv);
        rec.reason = Some(format!("user type {who}"));
        // A login is no key use: a record that cannot be written is logged, not fatal.
        let _ = self.audit_record(s, rec);
        r?;
        log::debug!("slot {}: {who} logged in", s.slot_id);
        let store = &self.stores[s.slot_id as usize];
        store.invalidate();
        // Logical handles follow their CMK's current object (renumbered by the token
        // after a logout).
        let logical = self.objects.logical_of(s.slot_id);
        if !logical.is_empty() {
            let view = self.view(s);
            for (h, id) in logical {
                if let Some((_, obj)) = view.cmks.get(&id).and_then(|c| c.primary()) {
                    self.objects.repoint(h, obj);
                }
            }
        }
        Ok(())
    }

    /// `C_Logout`.
    pub fn logout(&self, s: &mut Session) -> Result<()> {
        use cryptoki::session::SessionState as St;
        let state = s.backend().get_session_info()?.session_state();
        if matches!(state, St::RoPublic | St::RwPublic) {
            return err(CKR_USER_NOT_LOGGED_IN);
        }
        // The token's audit key is a private object, unusable once the user is logged
        // out: the logout is recorded first and covered by a token MAC while the login
        // lasts (otherwise this process's last records would wait for another process's
        // MAC). A logout the token then refuses (rare) gets a second record with its code.
        let _ = self.audit_record(s, crate::audit::Record::new("logout", CKR_OK));
        if let Err(rv) = self.audit.checkpoint() {
            log::warn!(
                "audit: no checkpoint before logout: {}",
                crate::backend::rv::name(rv)
            );
        }
        let r = s.backend().logout();
        if let Err(e) = &r {
            let rv = crate::backend::rv::from_cryptoki(e);
            let _ = self.audit_record(s, crate::audit::Record::new("logout", rv));
        }
        r?;
        self.stores[s.slot_id as usize].invalidate();
        self.forget_gone_objects(s);
        Ok(())
    }

    /// After a logout: forgets the handles of the objects the token no longer knows by
    /// the handle cmkp11 has (private objects, whose handles PKCS#11 makes invalid for
    /// good; private session objects, which it destroys). One attribute read per known
    /// object of the slot; a logout is rare.
    fn forget_gone_objects(&self, s: &Session) {
        let gone: Vec<CK_OBJECT_HANDLE> = self
            .objects
            .entries_of(s.slot_id)
            .into_iter()
            .filter(|(_, obj)| {
                matches!(
                    s.backend().get_attributes(*obj, &[AttributeType::Class]),
                    Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::ObjectHandleInvalid,
                        _
                    ))
                )
            })
            .map(|(h, _)| h)
            .collect();
        log::debug!(
            "slot {}: {} object handle(s) invalid after the logout",
            s.slot_id,
            gone.len()
        );
        self.objects.forget_all(&gone);
    }
}

/// What a backend call that makes an object returns: the new object or the backend's code.
pub type RawMade = std::result::Result<ObjectHandle, CK_RV>;

/// `CMKP11_ROLE_*` bits of a key.
pub fn role_bits(info: &KeyInfo) -> CK_ULONG {
    if info.class == CKO_SECRET_KEY {
        match SecretRole::of(info.usage) {
            Some(SecretRole::Wrap) => vendor::CMKP11_ROLE_WRAP,
            Some(SecretRole::Data) => vendor::CMKP11_ROLE_DATA,
            Some(SecretRole::Mac) => vendor::CMKP11_ROLE_MAC,
            None => 0,
        }
    } else {
        [
            (Usage::SIGN, vendor::CMKP11_ROLE_SIGN),
            (Usage::DECRYPT, vendor::CMKP11_ROLE_DECRYPT),
            (Usage::DERIVE, vendor::CMKP11_ROLE_DERIVE),
            (Usage::UNWRAP, vendor::CMKP11_ROLE_UNWRAP),
        ]
        .iter()
        .filter(|(u, _)| info.usage.any(*u))
        .fold(0, |b, (_, r)| b | r)
    }
}

/// An AES key unwrapped with AES-KW (RFC 3394) or AES-KWP (RFC 5649) is as long as the
/// blob minus its 8-byte integrity block (AES key lengths are multiples of 8, so KWP adds
/// no padding). SoftHSM2 reports `CKA_VALUE_LEN` 0 for such a key and refuses the
/// attribute in an unwrap template, so cmkp11 answers it from the blob.
fn aes_value_len_from_blob(
    mech: CK_MECHANISM_TYPE,
    blob_len: usize,
    aes: bool,
) -> Option<CK_ULONG> {
    (matches!(mech, CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD) && aes && blob_len > 8)
        .then(|| (blob_len - 8) as CK_ULONG)
}
