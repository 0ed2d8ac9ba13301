//! Man pages generated from a binary's own command-line definitions (`clap_mangen`), for
//! the package (`scripts/package.sh`): one page for the command and one per subcommand,
//! named `cmd-sub-subsub.1` as git and cargo name theirs.

use std::path::Path;

/// Writes `NAME.1` for `cmd` and each of its visible subcommands, recursively, into `dir`.
pub fn write_all(mut cmd: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    // Building gives every subcommand its display name (`cmkp11-key-create`).
    cmd.build();
    write_one(&cmd, dir)
}

fn write_one(cmd: &clap::Command, dir: &Path) -> std::io::Result<usize> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)?;
    let mut written = 1;
    for sub in cmd.get_subcommands() {
        if !sub.is_hide_set() && sub.get_name() != "help" {
            written += write_one(sub, dir)?;
        }
    }
    Ok(written)
}
