//! The backend module takes the mutexes cmkp11 gives it (`CK_C_INITIALIZE_ARGS`
//! callbacks): SoftHSM2 creates its mutexes through them when cmkp11 initializes it, uses
//! them while sessions open and keys are made, and destroys every one at `C_Finalize`.

mod common;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

#[test]
fn the_token_takes_cmkp11s_mutexes() {
    let env = common::test_env();
    let cfg = cmkp11::config::Config::from_file(&env.cmkp11_conf).expect("config");
    let before = cmkp11::sys::locks::live_mutexes();
    let backend = cmkp11::backend::token::Backend::open(&cfg, false, None).expect("open backend");
    let after_init = cmkp11::sys::locks::live_mutexes();
    assert!(
        after_init > before,
        "SoftHSM2 made no mutex through cmkp11's callbacks ({before} -> {after_init})"
    );

    // The token works on them: sessions, a login, a key and an encryption, from two
    // threads at once.
    let slot = backend.slots[0];
    std::thread::scope(|t| {
        for i in 0..2u8 {
            let ctx = &backend.ctx;
            t.spawn(move || {
                let s = ctx.open_rw_session(slot).expect("C_OpenSession");
                match s.login(
                    UserType::User,
                    Some(&AuthPin::from(common::USER_PIN.to_string())),
                ) {
                    Ok(())
                    | Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::UserAlreadyLoggedIn,
                        _,
                    )) => {}
                    Err(e) => panic!("C_Login: {e}"),
                }
                let key = s
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::AES),
                            Attribute::ValueLen(32.into()),
                            Attribute::Token(false),
                            Attribute::Encrypt(true),
                        ],
                    )
                    .expect("C_GenerateKey");
                for _ in 0..200 {
                    let ct = s
                        .encrypt(&Mechanism::AesCbcPad([i; 16]), key, &[i; 100])
                        .expect("C_Encrypt");
                    assert_eq!(ct.len(), 112);
                }
            });
        }
    });
    assert!(cmkp11::sys::locks::live_mutexes() >= after_init);

    backend.finalize().expect("C_Finalize");
    assert_eq!(
        cmkp11::sys::locks::live_mutexes(),
        before,
        "every mutex destroyed at C_Finalize"
    );
}
