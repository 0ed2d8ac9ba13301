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

/// Client mode (service mode's application side): each function is forwarded to the
/// daemon, which refuses it with `CKR_USER_NOT_LOGGED_IN` and records the attempt
/// (lifecycle changes are for operators, on the daemon's admin socket).
pub mod client {
    use super::guard;
    use crate::error::{err, Error};
    use crate::service::proto::{AdminCall, Reply, Request};
    use crate::vendor::{Cmkp11Version, CK_CMKP11_ADMIN_FUNCTION_LIST};
    use cryptoki_sys::{CKR_DEVICE_ERROR, CKR_OK};
    use std::os::raw::c_ulong;

    fn forward(name: &'static str, session: c_ulong, key: c_ulong, call: AdminCall) -> c_ulong {
        guard(name, || {
            let c = crate::service::client::current().map_err(Error::Rv)?;
            match c
                .call(&Request::Admin { session, key, call })
                .map_err(Error::Rv)?
            {
                Reply::Rv(CKR_OK) => Ok(()),
                Reply::Rv(rv) => err(rv),
                _ => err(CKR_DEVICE_ERROR),
            }
        })
    }

    /// `CMKP11_Rotate` of client mode.
    pub extern "C" fn CMKP11_Rotate(session: c_ulong, key: c_ulong) -> c_ulong {
        forward("CMKP11_Rotate", session, key, AdminCall::Rotate)
    }
    /// `CMKP11_Enable` of client mode.
    pub extern "C" fn CMKP11_Enable(session: c_ulong, key: c_ulong) -> c_ulong {
        forward("CMKP11_Enable", session, key, AdminCall::Enable)
    }
    /// `CMKP11_Disable` of client mode.
    pub extern "C" fn CMKP11_Disable(session: c_ulong, key: c_ulong) -> c_ulong {
        forward("CMKP11_Disable", session, key, AdminCall::Disable)
    }
    /// `CMKP11_ScheduleDeletion` of client mode.
    pub extern "C" fn CMKP11_ScheduleDeletion(
        session: c_ulong,
        key: c_ulong,
        days: c_ulong,
    ) -> c_ulong {
        forward(
            "CMKP11_ScheduleDeletion",
            session,
            key,
            AdminCall::ScheduleDeletion(days),
        )
    }
    /// `CMKP11_CancelDeletion` of client mode.
    pub extern "C" fn CMKP11_CancelDeletion(session: c_ulong, key: c_ulong) -> c_ulong {
        forward(
            "CMKP11_CancelDeletion",
            session,
            key,
            AdminCall::CancelDeletion,
        )
    }
    /// `CMKP11_Purge` of client mode.
    pub extern "C" fn CMKP11_Purge(session: c_ulong) -> c_ulong {
        forward("CMKP11_Purge", session, 0, AdminCall::Purge)
    }

    /// The admin function table of client mode.
    pub static CLIENT_ADMIN_FUNCTIONS: CK_CMKP11_ADMIN_FUNCTION_LIST =
        CK_CMKP11_ADMIN_FUNCTION_LIST {
            version: Cmkp11Version { major: 1, minor: 0 },
            CMKP11_Rotate: Some(CMKP11_Rotate),
            CMKP11_Enable: Some(CMKP11_Enable),
            CMKP11_Disable: Some(CMKP11_Disable),
            CMKP11_ScheduleDeletion: Some(CMKP11_ScheduleDeletion),
            CMKP11_CancelDeletion: Some(CMKP11_CancelDeletion),
            CMKP11_Purge: Some(CMKP11_Purge),
        };
}
