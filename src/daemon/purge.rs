//! The daemon's purge timer: keys past their deletion date are destroyed by `cmkp11d`
//! itself, on its own clock, every `service.purge_interval` seconds.
//!
//! In service mode the deletion date is set by the daemon (its clock, its
//! `deletion_window_days`) and the date is compared with the daemon's clock, so nothing
//! an application does (its clock, its calls, its login) moves a key's destruction
//! earlier or later. Each run is [`crate::runtime::Library::purge_by`] in a session of
//! the daemon's own (logged in with the token PIN at start): an `intent` record, then one
//! `purge` record per key destroyed, naming the key, with the reason [`REASON`] and the
//! daemon's own pid and uid. A run that fails (token unavailable, audit log not writable
//! under `on_failure = "deny"`) destroys nothing more than it recorded, is logged, and
//! the next run tries again.

use std::time::Duration;

/// The reason written in the audit records of the timer's purges.
pub const REASON: &str = "cmkp11d purge timer (service.purge_interval)";

/// Starts the timer thread: a first run after one interval, then one per interval.
/// `interval` 0 starts nothing.
pub fn start(interval: Duration) -> std::io::Result<()> {
    if interval.is_zero() {
        log::info!("cmkp11d: purge timer off (service.purge_interval = 0)");
        return Ok(());
    }
    std::thread::Builder::new()
        .name("cmkp11d-purge".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            run_once();
        })
        .map(|_| ())
}

/// One purge of every slot; returns the names of the keys destroyed.
pub fn run_once() -> Vec<String> {
    let lib = match crate::runtime::library() {
        Ok(l) => l,
        Err(_) => return Vec::new(),
    };
    let mut all = Vec::new();
    for slot in 0..lib.backend.slots.len() as cryptoki_sys::CK_SLOT_ID {
        let h = match lib.open_session(slot, true) {
            Ok(h) => h,
            Err(e) => {
                log::warn!("cmkp11d: purge timer: slot {slot}: cannot open a session: {e}");
                continue;
            }
        };
        let result = lib.session(h).and_then(|s| {
            let s = s.lock();
            lib.purge_by(&s, Some(REASON))
        });
        let _ = lib.close_session(h);
        match result {
            Ok(names) if names.is_empty() => {}
            Ok(names) => {
                log::warn!(
                    "cmkp11d: purge timer: slot {slot}: destroyed {} key(s) past their deletion date: {}",
                    names.len(),
                    names.join(", ")
                );
                all.extend(names);
            }
            Err(e) => log::error!(
                "cmkp11d: purge timer: slot {slot}: purge failed ({e}); the next run tries again"
            ),
        }
    }
    all
}
