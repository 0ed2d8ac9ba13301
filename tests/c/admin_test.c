/*
 * admin_test.c: a C application using cmkp11's "cmkp11 admin" vendor interface
 * (include/cmkp11.h) next to the standard "PKCS 11" interface, both obtained with
 * C_GetInterface from the dlopen'ed module.
 *
 *   admin_test /path/to/libcmkp11.so
 *
 * The environment must point the module at a token (CMKP11_CONFIG, SOFTHSM2_CONF; see
 * scripts/test-admin-c.sh); the first slot with a token is used, with user PIN
 * $CMKP11_TEST_PIN (default 1234).
 *
 * Generates a wrap CMK, rotates it, disables and enables it, schedules and cancels its
 * deletion, purges, and checks the vendor attributes and return codes at every step.
 * Prints one PASS/FAIL line per check and exits non-zero when any check failed.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pkcs11.h"
#include "cmkp11.h"

/* PKCS#11 3.0's CK_INTERFACE and C_GetInterface (a v2.40 pkcs11.h lacks them). */
typedef struct {
    CK_UTF8CHAR *pInterfaceName;
    void *pFunctionList;
    CK_FLAGS flags;
} cmk_interface;
typedef CK_RV (*cmk_get_interface_fn)(CK_UTF8CHAR *name, CK_VERSION *version,
                                      cmk_interface **out, CK_FLAGS flags);

static int failures;
static int checks;

static void report(int ok, const char *what, unsigned long got, unsigned long want)
{
    checks++;
    if (ok) {
        printf("PASS: %s\n", what);
    } else {
        failures++;
        printf("FAIL: %s (got 0x%lx, expected 0x%lx)\n", what, got, want);
    }
    fflush(stdout);
}

static void expect_rv(CK_RV got, CK_RV want, const char *what)
{
    report(got == want, what, got, want);
}

static CK_FUNCTION_LIST *f;
static CK_CMKP11_ADMIN_FUNCTION_LIST *admin;
static CK_SESSION_HANDLE session;

/* A CK_ULONG attribute, or (CK_ULONG)-1 when it cannot be read. */
static CK_ULONG get_ulong(CK_OBJECT_HANDLE key, CK_ATTRIBUTE_TYPE type)
{
    CK_ULONG value = 0;
    CK_ATTRIBUTE a = { type, &value, sizeof value };
    CK_RV rv = f->C_GetAttributeValue(session, key, &a, 1);
    if (rv != CKR_OK || a.ulValueLen != sizeof value) {
        printf("  C_GetAttributeValue(0x%lx): rv 0x%lx, length %lu\n", type, rv,
               a.ulValueLen);
        return (CK_ULONG)-1;
    }
    return value;
}

static void expect_attr(CK_OBJECT_HANDLE key, CK_ATTRIBUTE_TYPE type, CK_ULONG want,
                        const char *what)
{
    CK_ULONG got = get_ulong(key, type);
    report(got == want, what, got, want);
}

static CK_RV wrap_new_dek(CK_OBJECT_HANDLE cmk, CK_BYTE *blob, CK_ULONG *blob_len)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &cls, sizeof cls },       { CKA_KEY_TYPE, &kt, sizeof kt },
        { CKA_VALUE_LEN, &len, sizeof len },   { CKA_TOKEN, &no, sizeof no },
        { CKA_SENSITIVE, &yes, sizeof yes },   { CKA_EXTRACTABLE, &yes, sizeof yes },
        { CKA_ENCRYPT, &yes, sizeof yes },     { CKA_DECRYPT, &yes, sizeof yes },
    };
    CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_MECHANISM kwp = { CKM_AES_KEY_WRAP_PAD, NULL, 0 };
    CK_OBJECT_HANDLE dek;
    CK_RV rv = f->C_GenerateKey(session, &gen, t, sizeof t / sizeof t[0], &dek);
    if (rv != CKR_OK) {
        printf("  C_GenerateKey(DEK): 0x%lx\n", rv);
        return rv;
    }
    rv = f->C_WrapKey(session, &kwp, cmk, dek, blob, blob_len);
    f->C_DestroyObject(session, dek);
    return rv;
}

static CK_RV unwrap_blob(CK_OBJECT_HANDLE cmk, CK_BYTE *blob, CK_ULONG blob_len)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &cls, sizeof cls }, { CKA_KEY_TYPE, &kt, sizeof kt },
        { CKA_TOKEN, &no, sizeof no },   { CKA_ENCRYPT, &yes, sizeof yes },
        { CKA_DECRYPT, &yes, sizeof yes },
    };
    CK_MECHANISM kwp = { CKM_AES_KEY_WRAP_PAD, NULL, 0 };
    CK_OBJECT_HANDLE dek = CK_INVALID_HANDLE;
    CK_RV rv = f->C_UnwrapKey(session, &kwp, cmk, blob, blob_len, t,
                              sizeof t / sizeof t[0], &dek);
    if (rv == CKR_OK)
        f->C_DestroyObject(session, dek);
    return rv;
}

static int within(CK_ULONG date, time_t from, time_t to, long days)
{
    return date >= (CK_ULONG)(from + days * 86400) && date <= (CK_ULONG)(to + days * 86400);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s /path/to/libcmkp11.so\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        printf("FAIL: dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    cmk_get_interface_fn get_interface;
    *(void **)&get_interface = dlsym(lib, "C_GetInterface");
    report(get_interface != NULL, "C_GetInterface is exported", 0, 1);
    if (!get_interface)
        return 1;

    cmk_interface *pkcs11 = NULL, *adm = NULL;
    expect_rv(get_interface((CK_UTF8CHAR *)"PKCS 11", NULL, &pkcs11, 0), CKR_OK,
              "C_GetInterface(\"PKCS 11\")");
    expect_rv(get_interface((CK_UTF8CHAR *)CMKP11_ADMIN_INTERFACE_NAME, NULL, &adm, 0),
              CKR_OK, "C_GetInterface(\"" CMKP11_ADMIN_INTERFACE_NAME "\")");
    if (!pkcs11 || !adm || !pkcs11->pFunctionList || !adm->pFunctionList) {
        printf("FAIL: no function tables\n");
        return 1;
    }
    report(strcmp((char *)adm->pInterfaceName, CMKP11_ADMIN_INTERFACE_NAME) == 0,
           "admin interface name", 0, 0);
    /* The 3.0 table starts like the 2.40 one. */
    f = (CK_FUNCTION_LIST *)pkcs11->pFunctionList;
    admin = (CK_CMKP11_ADMIN_FUNCTION_LIST *)adm->pFunctionList;
    report(f->version.major == 3, "PKCS 11 interface is version 3.x", f->version.major, 3);
    report(admin->version.major == 1 && admin->version.minor == 0,
           "admin interface version 1.0", admin->version.major, 1);
    report(admin->CMKP11_Rotate && admin->CMKP11_Enable && admin->CMKP11_Disable &&
               admin->CMKP11_ScheduleDeletion && admin->CMKP11_CancelDeletion &&
               admin->CMKP11_Purge,
           "admin functions are all set", 0, 1);

    CK_C_INITIALIZE_ARGS init = { 0 };
    init.flags = CKF_OS_LOCKING_OK;
    CK_RV rv = f->C_Initialize(&init);
    expect_rv(rv, CKR_OK, "C_Initialize");
    if (rv != CKR_OK)
        return 1;

    CK_SLOT_ID slots[8];
    CK_ULONG nslots = 8;
    rv = f->C_GetSlotList(CK_TRUE, slots, &nslots);
    report(rv == CKR_OK && nslots >= 1, "a slot with a token", nslots, 1);
    if (rv != CKR_OK || nslots < 1)
        return 1;
    expect_rv(f->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                               &session),
              CKR_OK, "C_OpenSession");
    const char *pin = getenv("CMKP11_TEST_PIN");
    if (!pin || !*pin)
        pin = "1234";
    expect_rv(f->C_Login(session, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin)), CKR_OK,
              "C_Login");

    /* A wrap CMK. */
    char label[64];
    snprintf(label, sizeof label, "c-admin-%ld-%ld", (long)getpid(), (long)time(NULL));
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE t[] = {
        { CKA_CLASS, &cls, sizeof cls },     { CKA_KEY_TYPE, &kt, sizeof kt },
        { CKA_VALUE_LEN, &len, sizeof len }, { CKA_TOKEN, &yes, sizeof yes },
        { CKA_SENSITIVE, &yes, sizeof yes }, { CKA_WRAP, &yes, sizeof yes },
        { CKA_UNWRAP, &yes, sizeof yes },    { CKA_LABEL, label, strlen(label) },
    };
    CK_MECHANISM gen = { CKM_AES_KEY_GEN, NULL, 0 };
    CK_OBJECT_HANDLE cmk = CK_INVALID_HANDLE;
    rv = f->C_GenerateKey(session, &gen, t, sizeof t / sizeof t[0], &cmk);
    expect_rv(rv, CKR_OK, "C_GenerateKey(wrap CMK)");
    if (rv != CKR_OK)
        return 1;
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_ENABLED, "new CMK: STATE enabled");
    expect_attr(cmk, CKA_CMKP11_VERSION, 1, "new CMK: VERSION 1");
    expect_attr(cmk, CKA_CMKP11_VERSION_COUNT, 1, "new CMK: VERSION_COUNT 1");
    expect_attr(cmk, CKA_CMKP11_ORIGIN, CMKP11_ORIGIN_GENERATED, "new CMK: ORIGIN generated");
    expect_attr(cmk, CKA_CMKP11_ROLE, CMKP11_ROLE_WRAP, "new CMK: ROLE wrap");

    CK_BYTE blob1[64];
    CK_ULONG blob1_len = sizeof blob1;
    expect_rv(wrap_new_dek(cmk, blob1, &blob1_len), CKR_OK, "C_WrapKey at version 1");

    /* Rotate. */
    expect_rv(admin->CMKP11_Rotate(session, cmk), CKR_OK, "CMKP11_Rotate");
    expect_attr(cmk, CKA_CMKP11_VERSION, 2, "after rotation: VERSION 2");
    expect_attr(cmk, CKA_CMKP11_VERSION_COUNT, 2, "after rotation: VERSION_COUNT 2");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_ENABLED, "after rotation: enabled");
    expect_rv(unwrap_blob(cmk, blob1, blob1_len), CKR_OK,
              "a version-1 blob unwraps after rotation");

    /* Disable / enable. */
    CK_BYTE blob[64];
    CK_ULONG blob_len = sizeof blob;
    expect_rv(admin->CMKP11_Disable(session, cmk), CKR_OK, "CMKP11_Disable");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_DISABLED, "after disable: STATE disabled");
    expect_rv(wrap_new_dek(cmk, blob, &blob_len), CKR_KEY_FUNCTION_NOT_PERMITTED,
              "C_WrapKey with a disabled CMK");
    expect_rv(unwrap_blob(cmk, blob1, blob1_len), CKR_KEY_FUNCTION_NOT_PERMITTED,
              "C_UnwrapKey with a disabled CMK");
    expect_rv(admin->CMKP11_Enable(session, cmk), CKR_OK, "CMKP11_Enable");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_ENABLED, "after enable: STATE enabled");
    blob_len = sizeof blob;
    expect_rv(wrap_new_dek(cmk, blob, &blob_len), CKR_OK, "C_WrapKey after enable");

    /* Schedule and cancel deletion. */
    time_t before = time(NULL);
    expect_rv(admin->CMKP11_ScheduleDeletion(session, cmk, 7), CKR_OK,
              "CMKP11_ScheduleDeletion(7 days)");
    time_t after = time(NULL);
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_PENDING_DELETION,
                "after schedule: STATE pending deletion");
    CK_ULONG date = get_ulong(cmk, CKA_CMKP11_DELETION_DATE);
    report(within(date, before, after, 7), "DELETION_DATE is now + 7 days", date,
           (unsigned long)before + 7 * 86400);
    blob_len = sizeof blob;
    expect_rv(wrap_new_dek(cmk, blob, &blob_len), CKR_KEY_FUNCTION_NOT_PERMITTED,
              "C_WrapKey with a CMK pending deletion");
    expect_rv(admin->CMKP11_Enable(session, cmk), CKR_ACTION_PROHIBITED,
              "CMKP11_Enable while pending deletion");
    expect_rv(admin->CMKP11_CancelDeletion(session, cmk), CKR_OK, "CMKP11_CancelDeletion");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_DISABLED, "after cancel: STATE disabled");
    expect_attr(cmk, CKA_CMKP11_DELETION_DATE, 0, "after cancel: DELETION_DATE 0");
    expect_rv(admin->CMKP11_CancelDeletion(session, cmk), CKR_ACTION_PROHIBITED,
              "CMKP11_CancelDeletion when not pending deletion");
    expect_rv(admin->CMKP11_Enable(session, cmk), CKR_OK, "CMKP11_Enable after cancel");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_ENABLED, "enabled again");

    /* C_DestroyObject schedules deletion with the configured window (30 days). */
    before = time(NULL);
    expect_rv(f->C_DestroyObject(session, cmk), CKR_OK, "C_DestroyObject on the CMK");
    after = time(NULL);
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_PENDING_DELETION,
                "after C_DestroyObject: STATE pending deletion");
    date = get_ulong(cmk, CKA_CMKP11_DELETION_DATE);
    report(within(date, before, after, 30), "DELETION_DATE is now + 30 days", date,
           (unsigned long)before + 30 * 86400);

    /* Purge: nothing is past its date; the key stays. */
    expect_rv(admin->CMKP11_Purge(session), CKR_OK, "CMKP11_Purge");
    expect_attr(cmk, CKA_CMKP11_STATE, CMKP11_STATE_PENDING_DELETION,
                "after purge: still pending deletion");
    expect_rv(admin->CMKP11_CancelDeletion(session, cmk), CKR_OK, "CMKP11_CancelDeletion");
    expect_rv(admin->CMKP11_Enable(session, cmk), CKR_OK, "CMKP11_Enable");
    expect_rv(unwrap_blob(cmk, blob1, blob1_len), CKR_OK,
              "the version-1 blob still unwraps at the end");
    expect_attr(cmk, CKA_CMKP11_VERSION, 2, "end: VERSION 2");

    /* A read-only session cannot change a key. */
    CK_SESSION_HANDLE ro;
    if (f->C_OpenSession(slots[0], CKF_SERIAL_SESSION, NULL, NULL, &ro) == CKR_OK) {
        expect_rv(admin->CMKP11_Disable(ro, cmk), CKR_SESSION_READ_ONLY,
                  "CMKP11_Disable in a read-only session");
        f->C_CloseSession(ro);
    }
    report(admin->CMKP11_Rotate(session, 0x7ffffff0UL) != CKR_OK,
           "CMKP11_Rotate of an unknown handle fails", CKR_OK, 1);

    f->C_Logout(session);
    f->C_CloseSession(session);
    expect_rv(f->C_Finalize(NULL), CKR_OK, "C_Finalize");
    printf("%s: %d checks, %d failed\n", failures ? "FAIL" : "PASS", checks, failures);
    return failures ? 1 : 0;
}
