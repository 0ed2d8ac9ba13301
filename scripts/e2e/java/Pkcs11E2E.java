import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.Security;
import java.security.Signature;
import java.security.cert.X509Certificate;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.PSSParameterSpec;
import java.util.Arrays;
import javax.crypto.AEADBadTagException;
import javax.crypto.Cipher;
import javax.crypto.KeyGenerator;
import javax.crypto.SecretKey;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.IvParameterSpec;

/**
 * Java SunPKCS11 checks for scripts/e2e/java.sh.
 *
 * <pre>
 *   java Pkcs11E2E CONFIG PIN RSA_ALIAS EC_ALIAS [policy]
 * </pre>
 *
 * Loads the SunPKCS11 provider with CONFIG (whose library is the module under test), opens
 * the token's key store with PIN and, with the key pairs that keytool made in the token
 * (RSA_ALIAS, EC_ALIAS): signs with SHA256withRSA, RSASSA-PSS and SHA256withECDSA and
 * verifies every signature with the software providers (SunRsaSign, SunEC), never with the
 * token; encrypts and decrypts with AES-GCM and AES/CBC/PKCS5Padding under a session AES key
 * made by KeyGenerator in the token. With "policy" (the module under test is cmkp11) it also
 * checks that the session key's value cannot be read. Prints PASS/FAIL lines; exits 1 if
 * any check failed.
 */
public final class Pkcs11E2E {
    private static int failures = 0;
    private static final SecureRandom RANDOM = new SecureRandom();

    /** One check: throws (or returns a reason) when it fails. */
    private interface Check {
        /** Runs the check; a non-null result is the reason it failed. */
        String run() throws Exception;
    }

    private static void check(String name, Check c) {
        try {
            String why = c.run();
            if (why == null) {
                System.out.println("PASS " + name);
            } else {
                fail(name, why);
            }
        } catch (Throwable t) {
            StringBuilder sb = new StringBuilder(t.toString());
            for (Throwable cause = t.getCause(); cause != null; cause = cause.getCause()) {
                sb.append(" <- ").append(cause);
            }
            fail(name, sb.toString());
        }
        System.out.flush();
    }

    private static void fail(String name, String why) {
        failures++;
        System.out.println("FAIL " + name + ": " + why.replace('\n', ' '));
    }

    /** Signs data with the token key through p, verifies with the software provider. */
    private static String signVerify(Provider p, String alg, java.security.spec.AlgorithmParameterSpec spec,
            PrivateKey priv, PublicKey pub, String software) throws Exception {
        byte[] data = new byte[4096];
        RANDOM.nextBytes(data);
        Signature s = Signature.getInstance(alg, p);
        if (spec != null) {
            s.setParameter(spec);
        }
        s.initSign(priv);
        s.update(data);
        byte[] sig = s.sign();

        Signature v = Signature.getInstance(alg, software);
        if (spec != null) {
            v.setParameter(spec);
        }
        v.initVerify(pub);
        v.update(data);
        if (!v.verify(sig)) {
            return software + " rejected the token's " + alg + " signature";
        }
        data[7] ^= 1;
        v.initVerify(pub);
        v.update(data);
        if (v.verify(sig)) {
            return "the signature also verified over altered data (check is broken)";
        }
        return null;
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: Pkcs11E2E CONFIG PIN RSA_ALIAS EC_ALIAS [policy]");
            System.exit(2);
        }
        final String rsaAlias = args[2];
        final String ecAlias = args[3];
        final boolean policy = args.length > 4 && args[4].equals("policy");

        final Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        final KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, args[1].toCharArray());

        for (String alias : new String[] {rsaAlias, ecAlias}) {
            check("java-keystore-private-key-entry-" + alias, () -> {
                if (!ks.entryInstanceOf(alias, KeyStore.PrivateKeyEntry.class)) {
                    return alias + " is not a PrivateKeyEntry (aliases: " + java.util.Collections.list(ks.aliases()) + ")";
                }
                if (!(ks.getKey(alias, null) instanceof PrivateKey) || ks.getCertificate(alias) == null) {
                    return alias + ": no private key or no certificate";
                }
                return null;
            });
        }

        final PrivateKey rsa = (PrivateKey) ks.getKey(rsaAlias, null);
        final PrivateKey ec = (PrivateKey) ks.getKey(ecAlias, null);
        final X509Certificate rsaCert = (X509Certificate) ks.getCertificate(rsaAlias);
        final X509Certificate ecCert = (X509Certificate) ks.getCertificate(ecAlias);
        if (rsa != null && rsaCert != null) {
            check("java-sign-sha256withrsa", () -> signVerify(p, "SHA256withRSA", null, rsa,
                    rsaCert.getPublicKey(), "SunRsaSign"));
            check("java-sign-rsassa-pss", () -> signVerify(p, "RSASSA-PSS",
                    new PSSParameterSpec("SHA-256", "MGF1", MGF1ParameterSpec.SHA256, 32, 1), rsa,
                    rsaCert.getPublicKey(), "SunRsaSign"));
        }
        if (ec != null && ecCert != null) {
            check("java-sign-sha256withecdsa", () -> signVerify(p, "SHA256withECDSA", null, ec,
                    ecCert.getPublicKey(), "SunEC"));
        }

        // A session AES key made in the token by KeyGenerator (Java sends only the class and
        // the length).
        final SecretKey[] aes = new SecretKey[1];
        check("java-keygenerator-aes-session-key", () -> {
            KeyGenerator kg = KeyGenerator.getInstance("AES", p);
            kg.init(256);
            aes[0] = kg.generateKey();
            return aes[0] == null ? "no key" : null;
        });
        if (aes[0] == null) {
            System.exit(1);
        }
        final SecretKey k = aes[0];

        check("java-aes-gcm", () -> {
            byte[] pt = new byte[1000];
            RANDOM.nextBytes(pt);
            byte[] iv = new byte[12];
            RANDOM.nextBytes(iv);
            byte[] aad = "cmkp11 e2e aad".getBytes("UTF-8");
            Cipher c = Cipher.getInstance("AES/GCM/NoPadding", p);
            c.init(Cipher.ENCRYPT_MODE, k, new GCMParameterSpec(128, iv));
            c.updateAAD(aad);
            byte[] ct = c.doFinal(pt);
            if (ct.length != pt.length + 16) {
                return "ciphertext length " + ct.length + ", expected " + (pt.length + 16);
            }
            if (Arrays.equals(Arrays.copyOf(ct, pt.length), pt)) {
                return "ciphertext equals plaintext";
            }
            Cipher d = Cipher.getInstance("AES/GCM/NoPadding", p);
            d.init(Cipher.DECRYPT_MODE, k, new GCMParameterSpec(128, iv));
            d.updateAAD(aad);
            if (!Arrays.equals(d.doFinal(ct), pt)) {
                return "decryption differs from the plaintext";
            }
            byte[] bad = ct.clone();
            bad[3] ^= 1;
            Cipher e = Cipher.getInstance("AES/GCM/NoPadding", p);
            e.init(Cipher.DECRYPT_MODE, k, new GCMParameterSpec(128, iv));
            e.updateAAD(aad);
            try {
                e.doFinal(bad);
                return "a tampered ciphertext decrypted";
            } catch (AEADBadTagException expected) {
                return null;
            } catch (javax.crypto.BadPaddingException | java.security.ProviderException expected) {
                // SunPKCS11 reports CKR_ENCRYPTED_DATA_INVALID this way in some versions.
                return null;
            }
        });

        check("java-aes-cbc-pkcs5padding", () -> {
            byte[] pt = new byte[1001];
            RANDOM.nextBytes(pt);
            byte[] iv = new byte[16];
            RANDOM.nextBytes(iv);
            Cipher c = Cipher.getInstance("AES/CBC/PKCS5Padding", p);
            c.init(Cipher.ENCRYPT_MODE, k, new IvParameterSpec(iv));
            byte[] ct = c.doFinal(pt);
            if (ct.length != 1008) {
                return "ciphertext length " + ct.length + ", expected 1008";
            }
            Cipher d = Cipher.getInstance("AES/CBC/PKCS5Padding", p);
            d.init(Cipher.DECRYPT_MODE, k, new IvParameterSpec(iv));
            if (!Arrays.equals(d.doFinal(ct), pt)) {
                return "decryption differs from the plaintext";
            }
            return null;
        });

        if (policy) {
            // cmkp11 makes every secret key sensitive: its value never leaves the token.
            check("java-policy-session-key-value-unreadable", () ->
                    k.getEncoded() == null ? null : "the session key's value was readable ("
                            + k.getEncoded().length + " bytes)");
            for (PrivateKey key : new PrivateKey[] {rsa, ec}) {
                if (key != null) {
                    check("java-policy-private-key-value-unreadable-" + key.getAlgorithm(), () ->
                            key.getEncoded() == null ? null : "the private key's encoding was readable");
                }
            }
        }
        System.exit(failures == 0 ? 0 : 1);
    }
}
