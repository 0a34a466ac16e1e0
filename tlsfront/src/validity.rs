//! When a certificate starts to be valid, read from its DER (RFC 5280 section 4.1): the front checks a
//! client's chain and purpose in the handshake but leaves its dates to the API, which answers an expired
//! certificate with a 403 naming the expiry and an audit entry instead of a bare handshake failure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One DER TLV at the start of `input`: (tag, contents, rest). Short and long definite lengths only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7F) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (length, &rest[count..])
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

fn digits(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: u64, day: u64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ), as RFC 5280 requires them.
fn time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let (year, rest) = match (tag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])? as i64;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])? as i64, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (hour, minute, second) = (digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// The certificate's notBefore, or None if the DER is not a certificate this can read.
pub fn not_before(certificate: &[u8]) -> Option<SystemTime> {
    let cert = sequence(certificate, 0x30)?.0;
    let tbs = sequence(cert, 0x30)?.0;
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xA0 {
        rest = after; // [0] EXPLICIT version
    }
    let rest = sequence(rest, 0x02)?.1; // serialNumber
    let rest = sequence(rest, 0x30)?.1; // signature AlgorithmIdentifier
    let rest = sequence(rest, 0x30)?.1; // issuer Name
    let validity = sequence(rest, 0x30)?.0;
    let (tag, text, _) = tlv(validity)?;
    time(tag, text)
}

/// The contents and the rest after a TLV with tag ``expected`` at the start of ``input``.
fn sequence(input: &[u8], expected: u8) -> Option<(&[u8], &[u8])> {
    let (tag, contents, rest) = tlv(input)?;
    if tag == expected { Some((contents, rest)) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_generalized_times() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(UNIX_EPOCH));
        assert_eq!(time(0x17, b"261124052000Z"), Some(UNIX_EPOCH + Duration::from_secs(1_795_497_600)));
        assert_eq!(time(0x18, b"20500101000000Z"), Some(UNIX_EPOCH + Duration::from_secs(2_524_608_000)));
        assert_eq!(time(0x17, b"491231235959Z"), Some(UNIX_EPOCH + Duration::from_secs(2_524_607_999)));
        assert_eq!(time(0x17, b"261324052000Z"), None); // month 13
        assert_eq!(time(0x17, b"2611240520Z"), None);
        assert_eq!(time(0x17, b"261124052000+"), None);
        assert_eq!(time(0x04, b"261124052000Z"), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(not_before(b""), None);
        assert_eq!(not_before(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(not_before(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
