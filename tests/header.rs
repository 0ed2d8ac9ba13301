//! `include/cmkp11.h` is generated from `src/vendor.rs` by cbindgen: this test regenerates
//! it and fails if the checked-in copy differs (run with CMKP11_WRITE_HEADER=1 to update).

#[test]
fn header_is_fresh() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(format!("{root}/cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(cfg)
        .with_src(format!("{root}/src/vendor.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let path = format!("{root}/include/cmkp11.h");
    if std::env::var_os("CMKP11_WRITE_HEADER").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == out,
        "include/cmkp11.h is stale: run `CMKP11_WRITE_HEADER=1 cargo test --test header` and commit it"
    );
    let text = String::from_utf8(out).unwrap();
    for name in [
        "CKA_CMKP11_STATE",
        "CMKP11_STATE_PENDING_DELETION",
        "CMKP11_ORIGIN_IMPORTED",
        "CMKP11_ROLE_WRAP",
    ] {
        assert!(text.contains(name), "{name} missing from the header");
    }
}
