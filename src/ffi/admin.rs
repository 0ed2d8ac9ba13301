//! The "cmkp11 admin" vendor interface (declared in `include/cmkp11.h`): lifecycle steps
//! on a key through a logged-in read-write session, the same steps as the CLI.

#![allow(non_snake_case)]

use super::entry::with_session;
use super::guard;
use crate::runtime::admin::Action;
use crate::vendor::{Cmkp11Version, CK_CMKP11_ADMIN_FUNCTION_LIST};
use std::os::raw::c_ulong;

fn step(name: &'static str, session: c_ulong, key: c_ulong, action: Action) -> c_ulong {
    guard(name, || {
        with_session(session, |lib, s| {
            let cmk = lib.cmk_by_handle(s, key)?;
            lib.apply(s, &cmk, action).map(drop)
        })
    })
}

/// Rotates a secret CMK.
pub extern "C" fn CMKP11_Rotate(session: c_ulong, key: c_ulong) -> c_ulong {
    step("CMKP11_Rotate", session, key, Action::Rotate)
}

/// Enables a disabled CMK.
pub extern "C" fn CMKP11_Enable(session: c_ulong, key: c_ulong) -> c_ulong {
    step("CMKP11_Enable", session, key, Action::Enable)
}

/// Disables a CMK.
pub extern "C" fn CMKP11_Disable(session: c_ulong, key: c_ulong) -> c_ulong {
    step("CMKP11_Disable", session, key, Action::Disable)
}

/// Schedules a CMK's deletion in `days` days (0: the configured window).
pub extern "C" fn CMKP11_ScheduleDeletion(
    session: c_ulong,
    key: c_ulong,
    days: c_ulong,
) -> c_ulong {
    let days = (days != 0).then(|| u32::try_from(days).unwrap_or(u32::MAX));
    step(
        "CMKP11_ScheduleDeletion",
        session,
        key,
        Action::ScheduleDeletion(days),
    )
}

/// Cancels a scheduled deletion (the key becomes disabled).
pub extern "C" fn CMKP11_CancelDeletion(session: c_ulong, key: c_ulong) -> c_ulong {
    step(
        "CMKP11_CancelDeletion",
        session,
        key,
        Action::CancelDeletion,
    )
}

/// Destroys the keys whose deletion date has passed.
pub extern "C" fn CMKP11_Purge(session: c_ulong) -> c_ulong {
    guard("CMKP11_Purge", || {
        with_session(session, |lib, s| lib.purge(s).map(drop))
    })
}

/// The admin function table.
pub static ADMIN_FUNCTIONS: CK_CMKP11_ADMIN_FUNCTION_LIST = CK_CMKP11_ADMIN_FUNCTION_LIST {
    version: Cmkp11Version { major: 1, minor: 0 },
    CMKP11_Rotate: Some(CMKP11_Rotate),
    CMKP11_Enable: Some(CMKP11_Enable),
    CMKP11_Disable: Some(CMKP11_Disable),
    CMKP11_ScheduleDeletion: Some(CMKP11_ScheduleDeletion),
    CMKP11_CancelDeletion: Some(CMKP11_CancelDeletion),
    CMKP11_Purge: Some(CMKP11_Purge),
};
