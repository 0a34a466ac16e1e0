//! Client certificate verification: a robot's certificate must be signed by the fleet intermediate
//! (the only trust anchor, given by --client-ca) and allow clientAuth; whatever else the client sends in
//! its Certificate message is ignored.
//!
//! Why: the fleet issues robot certificates from the intermediate alone, so the only valid chain is
//! leaf -> intermediate. Handing the client's extra certificates to webpki 0.22.0's path building
//! (what rustls' `AllowAnyAnonymousOrAuthenticatedClient` does) lets an unauthenticated client make it
//! search an exponential number of paths (RUSTSEC-2023-0052, fixed in webpki 0.22.2; Debian 12 ships
//! 0.22.0): with no intermediates, verification is one parse and one signature check per anchor.
//! Dates are checked at the certificate's own notBefore: the API checks them with its clock and answers
//! an expired certificate itself.

use std::time::UNIX_EPOCH;

use rustls::server::{ClientCertVerified, ClientCertVerifier};
use rustls::{Certificate, DistinguishedNames, RootCertStore};

use crate::validity;

/// Signature algorithms an issuer's signature on a client certificate may use (rustls' own list).
static SIGNATURE_ALGORITHMS: &[&webpki::SignatureAlgorithm] = &[
    &webpki::ECDSA_P256_SHA256,
    &webpki::ECDSA_P256_SHA384,
    &webpki::ECDSA_P384_SHA256,
    &webpki::ECDSA_P384_SHA384,
    &webpki::ED25519,
    &webpki::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    &webpki::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    &webpki::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    &webpki::RSA_PKCS1_2048_8192_SHA256,
    &webpki::RSA_PKCS1_2048_8192_SHA384,
    &webpki::RSA_PKCS1_2048_8192_SHA512,
    &webpki::RSA_PKCS1_3072_8192_SHA384,
];

/// One issuer's name, key and name constraints, owned (webpki's `TrustAnchor` borrows them).
struct Anchor {
    subject: Vec<u8>,
    spki: Vec<u8>,
    name_constraints: Option<Vec<u8>>,
}

impl Anchor {
    fn borrow(&self) -> webpki::TrustAnchor<'_> {
        webpki::TrustAnchor {
            subject: &self.subject,
            spki: &self.spki,
            name_constraints: self.name_constraints.as_deref(),
        }
    }
}

/// Optional client authentication against the fleet intermediate(s) alone; see the module docs.
pub struct FleetIssuer {
    anchors: Vec<Anchor>,
    subjects: DistinguishedNames,
}

impl FleetIssuer {
    /// The verifier for these issuer certificates (DER); an error names the one that is not a usable CA.
    pub fn new(issuers: &[Certificate]) -> Result<Self, String> {
        let mut anchors = Vec::with_capacity(issuers.len());
        let mut store = RootCertStore::empty();
        for (index, issuer) in issuers.iter().enumerate() {
            let anchor = webpki::TrustAnchor::try_from_cert_der(&issuer.0)
                .map_err(|e| format!("certificate {} is not a usable CA certificate: {e:?}", index + 1))?;
            anchors.push(Anchor {
                subject: anchor.subject.to_vec(),
                spki: anchor.spki.to_vec(),
                name_constraints: anchor.name_constraints.map(<[u8]>::to_vec),
            });
            store.add(issuer).map_err(|e| format!("certificate {}: {e}", index + 1))?;
        }
        // The CertificateRequest's list of acceptable issuers, encoded once; rustls 0.20 has no other
        // public way to build a DistinguishedName than this deprecated one.
        #[allow(deprecated)]
        let subjects = store.subjects();
        Ok(FleetIssuer { anchors, subjects })
    }
}

/// rustls' mapping of webpki's errors (its own is private).
fn rustls_error(error: webpki::Error) -> rustls::Error {
    match error {
        webpki::Error::BadDer | webpki::Error::BadDerTime => rustls::Error::InvalidCertificateEncoding,
        webpki::Error::InvalidSignatureForPublicKey => rustls::Error::InvalidCertificateSignature,
        webpki::Error::UnsupportedSignatureAlgorithm | webpki::Error::UnsupportedSignatureAlgorithmForPublicKey => {
            rustls::Error::InvalidCertificateSignatureType
        }
        e => rustls::Error::InvalidCertificateData(format!("invalid peer certificate: {e}")),
    }
}

impl ClientCertVerifier for FleetIssuer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> Option<bool> {
        Some(false) // enrolment authenticates with a bootstrap token instead
    }

    fn client_auth_root_subjects(&self) -> Option<DistinguishedNames> {
        Some(self.subjects.clone())
    }

    fn verify_client_cert(&self, end_entity: &Certificate, _intermediates: &[Certificate],
                          _now: std::time::SystemTime) -> Result<ClientCertVerified, rustls::Error> {
        let start = validity::not_before(&end_entity.0).ok_or(rustls::Error::InvalidCertificateEncoding)?;
        let seconds = start.duration_since(UNIX_EPOCH).map_err(|_| rustls::Error::InvalidCertificateEncoding)?;
        let at = webpki::Time::from_seconds_since_unix_epoch(seconds.as_secs());
        let cert = webpki::EndEntityCert::try_from(end_entity.0.as_slice()).map_err(rustls_error)?;
        let anchors: Vec<webpki::TrustAnchor<'_>> = self.anchors.iter().map(Anchor::borrow).collect();
        cert.verify_is_valid_tls_client_cert(SIGNATURE_ALGORITHMS, &webpki::TlsClientTrustAnchors(&anchors), &[], at)
            .map_err(rustls_error)?;
        Ok(ClientCertVerified::assertion())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn der(bytes: &[u8]) -> Certificate {
        Certificate(bytes.to_vec())
    }

    fn verifier() -> FleetIssuer {
        FleetIssuer::new(&[der(include_bytes!("../testdata/issuer.der"))]).unwrap()
    }

    fn verify(leaf: &[u8], intermediates: &[Certificate]) -> Result<ClientCertVerified, rustls::Error> {
        verifier().verify_client_cert(&der(leaf), intermediates, SystemTime::now())
    }

    #[test]
    fn a_robot_of_the_issuer_is_accepted_whatever_its_dates_and_whatever_else_it_sends() {
        let robot = include_bytes!("../testdata/robot.der"); // expired since 2024
        assert!(verify(robot, &[]).is_ok());
        let junk = [der(b"not a certificate"), der(include_bytes!("../testdata/sub_ca.der"))];
        assert!(verify(robot, &junk).is_ok());
    }

    #[test]
    fn a_chain_through_a_certificate_the_client_sends_is_refused() {
        // rustls' own verifier accepts this chain (leaf -> sub-CA sent by the client -> issuer)
        let sub_ca = der(include_bytes!("../testdata/sub_ca.der"));
        let sub_robot = include_bytes!("../testdata/sub_robot.der");
        let mut roots = RootCertStore::empty();
        roots.add(&der(include_bytes!("../testdata/issuer.der"))).unwrap();
        let rustls_own = rustls::server::AllowAnyAuthenticatedClient::new(roots);
        let start = validity::not_before(sub_robot).unwrap();
        assert!(rustls_own.verify_client_cert(&der(sub_robot), std::slice::from_ref(&sub_ca), start).is_ok());
        assert!(matches!(verify(sub_robot, &[sub_ca]), Err(rustls::Error::InvalidCertificateData(_))));
    }

    #[test]
    fn a_forged_signature_or_another_purpose_is_refused() {
        let forged = include_bytes!("../testdata/forged.der");
        assert!(matches!(verify(forged, &[]), Err(rustls::Error::InvalidCertificateData(_))));
        let server_only = include_bytes!("../testdata/server_only.der");
        let refused = verify(server_only, &[]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("RequiredEkuNotFound"), "{refused}");
        assert!(matches!(verify(b"\x30\x03\x02\x01\x00", &[]), Err(rustls::Error::InvalidCertificateEncoding)));
    }

    #[test]
    fn the_issuer_is_named_in_the_certificate_request_and_a_bad_one_is_named() {
        let subjects = verifier().client_auth_root_subjects().unwrap();
        assert_eq!(subjects.len(), 1);
        let error = FleetIssuer::new(&[der(include_bytes!("../testdata/issuer.der")), der(b"junk")]).err();
        assert!(error.unwrap_or_default().starts_with("certificate 2 is not a usable CA certificate"));
    }
}
