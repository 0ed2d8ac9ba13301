"""PyKCS11 client flows for the cmkp11 end-to-end suite (driven by scripts/e2e/python.sh).

    python3 pykcs11_flows.py envelope
    python3 pykcs11_flows.py tde-encrypt STATE_FILE     (first process)
    python3 pykcs11_flows.py tde-decrypt STATE_FILE     (second process)

Environment: E2E_MODULE (PKCS#11 module), E2E_TOKEN (token label), E2E_PIN.
Each check prints `PASS name`, `FAIL name: reason` or `SKIP name: reason`.
"""

import binascii
import json
import os
import sys

import PyKCS11
from PyKCS11 import (
    CKA_CLASS,
    CKA_DECRYPT,
    CKA_ENCRYPT,
    CKA_EXTRACTABLE,
    CKA_ID,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_PRIVATE,
    CKA_SENSITIVE,
    CKA_TOKEN,
    CKA_UNWRAP,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKA_WRAP,
    CKF_RW_SESSION,
    CKF_SERIAL_SESSION,
    CKK_AES,
    CKM_AES_CBC_PAD,
    CKM_AES_KEY_GEN,
    CKM_AES_KEY_WRAP,
    CKM_AES_KEY_WRAP_PAD,
    CKO_SECRET_KEY,
    CKR,
)

TRUE, FALSE = PyKCS11.CK_TRUE, PyKCS11.CK_FALSE

# kryoptic 1.0 has RFC 5649 only as CKM_AES_KEY_WRAP_KWP, not CKM_AES_KEY_WRAP_PAD
# (README "token differences"): over it cmkp11 refuses AES-KWP naming the missing
# capability, and the envelope flow wraps with AES-KW (RFC 3394) instead.
TOKEN_HAS_KWP = os.environ.get("E2E_BACKEND", "softhsm2") != "kryoptic"


def report(status, name, reason=""):
    print(f"{status} {name}" + (f": {reason}" if reason else ""), flush=True)


def err(e):
    """Short text for an exception: the CKR_* name for PKCS#11 errors."""
    if isinstance(e, PyKCS11.PyKCS11Error):
        return CKR.get(e.value, hex(e.value))
    return f"{type(e).__name__}: {e}"


class Checks:
    """Runs named checks; a check that raises is a FAIL with the error."""

    def __init__(self):
        self.failed = 0

    def check(self, name, fn, *args):
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - every error is a reported failure
            self.failed += 1
            report("FAIL", name, err(e))
            return None
        report("PASS", name)
        return result


def open_session():
    lib = PyKCS11.PyKCS11Lib()
    lib.load(os.environ["E2E_MODULE"])
    label = os.environ["E2E_TOKEN"]
    for slot in lib.getSlotList(tokenPresent=True):
        if lib.getTokenInfo(slot).label.strip() == label:
            session = lib.openSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)
            session.login(os.environ["E2E_PIN"])
            return lib, session
    raise RuntimeError(f"no token labelled {label!r}")


def expect_refused(fn, *args):
    """Returns the CKR_* name of the refusal; raises if fn succeeded."""
    try:
        fn(*args)
    except PyKCS11.PyKCS11Error as e:
        return err(e)
    raise AssertionError("the operation succeeded")


def gcm(session, iv, aad=b"cmkp11-e2e"):
    return PyKCS11.AES_GCM_Mechanism(iv, aad, 128)


# --- envelope encryption -------------------------------------------------------------

def envelope():
    c = Checks()
    lib, s = c.check("envelope-open-session-login", open_session) or (None, None)
    if s is None:
        return 1
    kwp = PyKCS11.Mechanism(CKM_AES_KEY_WRAP_PAD, None)
    gen = PyKCS11.Mechanism(CKM_AES_KEY_GEN, None)

    cmk = c.check("envelope-generate-wrap-cmk", s.generateKey, [
        (CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32),
        (CKA_TOKEN, TRUE), (CKA_PRIVATE, TRUE), (CKA_SENSITIVE, TRUE),
        (CKA_EXTRACTABLE, FALSE), (CKA_WRAP, TRUE), (CKA_UNWRAP, TRUE),
        (CKA_LABEL, "e2e-envelope-cmk"), (CKA_ID, b"\x01\x02\x03\x04"),
    ], gen)
    dek = c.check("envelope-generate-dek", s.generateKey, [
        (CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32),
        (CKA_TOKEN, FALSE), (CKA_SENSITIVE, TRUE), (CKA_EXTRACTABLE, TRUE),
        (CKA_ENCRYPT, TRUE), (CKA_DECRYPT, TRUE), (CKA_LABEL, "e2e-dek"),
    ], gen)
    if cmk is None or dek is None:
        return 1

    def dek_value_hidden():
        # Low-level call: PyKCS11's getAttributeValue turns the refusal into None.
        tmpl = PyKCS11.LowLevel.ckattrlist(1)
        tmpl[0].SetType(CKA_VALUE)
        rv = s.lib.C_GetAttributeValue(s.session, dek, tmpl)
        if rv != PyKCS11.CKR_ATTRIBUTE_SENSITIVE:
            raise AssertionError(f"reading CKA_VALUE gave {CKR.get(rv, hex(rv))}, "
                                 "not CKR_ATTRIBUTE_SENSITIVE")
    c.check("envelope-dek-value-not-readable", dek_value_hidden)

    wrap_name = "aes-kwp"
    if not TOKEN_HAS_KWP:
        def kwp_refused():
            try:
                s.wrapKey(cmk, dek, kwp)
            except PyKCS11.PyKCS11Error as e:
                if e.value != PyKCS11.CKR_MECHANISM_INVALID:
                    raise
                return
            raise AssertionError("AES-KWP wrapped on a token that lacks it")
        c.check("envelope-aes-kwp-refused-as-missing", kwp_refused)
        kwp = PyKCS11.Mechanism(CKM_AES_KEY_WRAP, None)
        wrap_name = "aes-kw"

    def wrap():
        blob = bytes(s.wrapKey(cmk, dek, kwp))
        # RFC 5649 (and RFC 3394): a 32-byte key wraps to 40 bytes (8-byte integrity block
        # + key).
        if len(blob) != 40:
            raise AssertionError(f"blob is {len(blob)} bytes, RFC 5649 gives 40")
        return blob
    blob = c.check(f"envelope-wrap-{wrap_name}", wrap)
    if blob is None:
        return 1

    unwrap_template = [
        (CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_TOKEN, FALSE),
        (CKA_SENSITIVE, TRUE), (CKA_ENCRYPT, TRUE), (CKA_DECRYPT, TRUE),
        (CKA_LABEL, "e2e-dek-unwrapped"),
    ]

    def unwrap():
        return s.unwrapKey(cmk, blob, unwrap_template, kwp)
    dek2 = c.check(f"envelope-unwrap-{wrap_name}", unwrap)
    if dek2 is None:
        return 1

    def unwrapped_length():
        vlen = s.getAttributeValue(dek2, [CKA_VALUE_LEN])[0]
        if vlen != 32:
            raise AssertionError(f"unwrapped key has CKA_VALUE_LEN {vlen}, expected 32 (from the blob)")
    c.check("envelope-unwrapped-value-len", unwrapped_length)

    def round_trip():
        msg = os.urandom(4096)
        for enc_key, dec_key in ((dek, dek2), (dek2, dek)):
            iv = bytes(s.generateRandom(12))
            ct = bytes(s.encrypt(enc_key, msg, gcm(s, iv)))
            if len(ct) != len(msg) + 16:
                raise AssertionError(f"ciphertext is {len(ct)} bytes, expected {len(msg) + 16}")
            pt = bytes(s.decrypt(dec_key, ct, gcm(s, iv)))
            if pt != msg:
                raise AssertionError("decryption with the other key gave different bytes")
        return msg
    c.check("envelope-aes-gcm-round-trip", round_trip)

    def tampered_ciphertext():
        iv = bytes(s.generateRandom(12))
        ct = bytearray(s.encrypt(dek, b"table row", gcm(s, iv)))
        ct[0] ^= 0x01
        expect_refused(s.decrypt, dek2, bytes(ct), gcm(s, iv))
    c.check("envelope-gcm-tampered-ciphertext-refused", tampered_ciphertext)

    def corrupted_blob():
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0x80
        code = expect_refused(s.unwrapKey, cmk, bytes(bad), unwrap_template, kwp)
        # DESIGN.md section 4: every unwrap failure gives the same code (no oracle).
        if code != "CKR_WRAPPED_KEY_INVALID":
            raise AssertionError(f"refused with {code}, expected CKR_WRAPPED_KEY_INVALID")
    c.check("envelope-corrupted-blob-refused", corrupted_blob)

    s.logout()
    s.closeSession()
    return 1 if c.failed else 0


# --- Oracle-TDE-style master key by label, CBC-PAD, two processes -------------------------

def tde_label(state):
    return "ORACLE.TDE.HSM.MK." + state["mkid"]


def find_by_label(s, label):
    return s.findObjects([(CKA_CLASS, CKO_SECRET_KEY), (CKA_LABEL, label)])


def tde_encrypt(state_file):
    c = Checks()
    lib, s = c.check("tde-open-session-login", open_session) or (None, None)
    if s is None:
        return 1
    state = {"mkid": binascii.hexlify(os.urandom(16)).decode().upper()}
    label = tde_label(state)

    def find_or_generate():
        found = find_by_label(s, label)
        if found:
            raise AssertionError(f"a fresh label already names {len(found)} object(s)")
        key = s.generateKey([
            (CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32),
            (CKA_TOKEN, TRUE), (CKA_PRIVATE, TRUE), (CKA_SENSITIVE, TRUE),
            (CKA_EXTRACTABLE, FALSE), (CKA_ENCRYPT, TRUE), (CKA_DECRYPT, TRUE),
            (CKA_LABEL, label), (CKA_ID, binascii.unhexlify(state["mkid"])),
        ], PyKCS11.Mechanism(CKM_AES_KEY_GEN, None))
        again = find_by_label(s, label)
        if len(again) != 1:
            raise AssertionError(f"after generating, the label finds {len(again)} objects")
        return key
    mk = c.check("tde-generate-master-key-by-label", find_or_generate)
    if mk is None:
        return 1

    def encrypt_table_key():
        table_key = os.urandom(32)
        iv = bytes(s.generateRandom(16))
        ct = bytes(s.encrypt(mk, table_key, PyKCS11.Mechanism(CKM_AES_CBC_PAD, iv)))
        if len(ct) != 48:
            raise AssertionError(f"CBC-PAD of 32 bytes gave {len(ct)} bytes, expected 48")
        pt = bytes(s.decrypt(mk, ct, PyKCS11.Mechanism(CKM_AES_CBC_PAD, iv)))
        if pt != table_key:
            raise AssertionError("decrypting in the same session gave different bytes")
        state.update(iv=iv.hex(), ct=ct.hex(), table_key=table_key.hex())
        return True
    if c.check("tde-encrypt-table-key-cbc-pad", encrypt_table_key) is None:
        return 1
    with open(state_file, "w") as f:
        json.dump(state, f)
    s.logout()
    s.closeSession()
    return 1 if c.failed else 0


def tde_decrypt(state_file):
    c = Checks()
    with open(state_file) as f:
        state = json.load(f)
    lib, s = c.check("tde-second-process-login", open_session) or (None, None)
    if s is None:
        return 1

    def find():
        found = find_by_label(s, tde_label(state))
        if len(found) != 1:
            raise AssertionError(f"the label finds {len(found)} objects, expected 1")
        key_id = bytes(s.getAttributeValue(found[0], [CKA_ID], True)[0])
        if key_id.hex().upper() != state["mkid"]:
            raise AssertionError("CKA_ID differs from the one given at generation")
        return found[0]
    mk = c.check("tde-second-process-finds-master-key", find)
    if mk is None:
        return 1

    def decrypt():
        iv = bytes.fromhex(state["iv"])
        pt = bytes(s.decrypt(mk, bytes.fromhex(state["ct"]),
                             PyKCS11.Mechanism(CKM_AES_CBC_PAD, iv)))
        if pt.hex() != state["table_key"]:
            raise AssertionError("the second process decrypted different bytes")
    c.check("tde-second-process-decrypts-table-key", decrypt)
    s.logout()
    s.closeSession()
    return 1 if c.failed else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "envelope":
        return envelope()
    if len(argv) == 3 and argv[1] == "tde-encrypt":
        return tde_encrypt(argv[2])
    if len(argv) == 3 and argv[1] == "tde-decrypt":
        return tde_decrypt(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
