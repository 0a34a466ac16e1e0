//! The PROXY protocol v2 header (HAProxy's proxy-protocol.txt, section 2.2) that opens every upstream
//! connection: who the robot is (address), and what the handshake established (TLS version and the
//! verified client certificate). The API trusts it because only this process can reach its socket.

use std::net::SocketAddr;

/// The 12-byte v2 signature.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// PP2_TYPE_SSL: the connection used TLS; carries sub-TLVs.
pub const TYPE_SSL: u8 = 0x20;
/// PP2_SUBTYPE_SSL_VERSION: the TLS version, as US-ASCII ("TLSv1.3").
pub const SUBTYPE_SSL_VERSION: u8 = 0x21;
/// PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN: TLS, and a client certificate was presented on this connection.
const CLIENT_SSL: u8 = 0x01;
const CLIENT_CERT_CONN: u8 = 0x02;
/// First of the types the specification leaves to applications (PP2_TYPE_MIN_CUSTOM): the DER of the
/// client's end-entity certificate, verified against the client CA in the handshake (dates excepted).
pub const TYPE_CLIENT_CERT_DER: u8 = 0xE0;

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// The header for one connection from `source` to `destination` (both IPv4 or both IPv6; a mixed pair,
/// which a single socket cannot produce, is sent as IPv6 with v4-mapped addresses).
pub fn encode(source: SocketAddr, destination: SocketAddr, tls_version: &str, client_cert: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + client_cert.map_or(0, <[u8]>::len));
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x11 // AF_INET, STREAM
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
                SocketAddr::V6(v6) => *v6.ip(),
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x21 // AF_INET6, STREAM
        }
    };
    let mut ssl = vec![CLIENT_SSL | if client_cert.is_some() { CLIENT_CERT_CONN } else { 0 }];
    ssl.extend_from_slice(&0u32.to_be_bytes()); // verify: 0 = the client certificate verified
    tlv(&mut ssl, SUBTYPE_SSL_VERSION, tls_version.as_bytes());
    tlv(&mut body, TYPE_SSL, &ssl);
    if let Some(der) = client_cert {
        tlv(&mut body, TYPE_CLIENT_CERT_DER, der);
    }
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_with_a_certificate() {
        let header = encode("10.203.0.5:40000".parse().unwrap(), "10.203.0.1:8443".parse().unwrap(), "TLSv1.3",
                            Some(b"DER"));
        assert_eq!(&header[..12], &SIGNATURE);
        assert_eq!(header[12], 0x21);
        assert_eq!(header[13], 0x11);
        let length = u16::from_be_bytes([header[14], header[15]]) as usize;
        assert_eq!(header.len(), 16 + length);
        assert_eq!(&header[16..20], &[10, 203, 0, 5]);
        assert_eq!(&header[20..24], &[10, 203, 0, 1]);
        assert_eq!(u16::from_be_bytes([header[24], header[25]]), 40000);
        assert_eq!(u16::from_be_bytes([header[26], header[27]]), 8443);
        // PP2_TYPE_SSL: client flags, verify, then the version sub-TLV
        assert_eq!(header[28], TYPE_SSL);
        let ssl_len = u16::from_be_bytes([header[29], header[30]]) as usize;
        assert_eq!(header[31], 0x03);
        assert_eq!(&header[32..36], &[0, 0, 0, 0]);
        assert_eq!(header[36], SUBTYPE_SSL_VERSION);
        assert_eq!(&header[39..46], b"TLSv1.3");
        let cert = 31 + ssl_len;
        assert_eq!(header[cert], TYPE_CLIENT_CERT_DER);
        assert_eq!(&header[cert + 3..], b"DER");
    }

    #[test]
    fn ipv6_without_a_certificate() {
        let header = encode("[2001:db8::5]:40000".parse().unwrap(), "[2001:db8::1]:8443".parse().unwrap(), "TLSv1.2",
                            None);
        assert_eq!(header[13], 0x21);
        assert_eq!(header.len(), 16 + 36 + 3 + 5 + 3 + 7); // addresses and the SSL TLV only
        assert_eq!(header[16 + 36 + 3], 0x01); // TLS, no client certificate
    }
}
