//! Release version ordering, for downgrade and minimum-source checks.
//!
//! Versions are compared piece by piece: runs of digits numerically, other runs as
//! text, `.`, `-`, `_`, `+` and `~` as separators; a version that is a prefix of
//! another is older (`1.2` < `1.2.1`). This orders semver, Azure Linux style
//! (`3.0.20241101`) and date stamps the way people expect without a schema.

use std::cmp::Ordering;

fn pieces(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b"._-+~".contains(&b[i]) {
            i += 1;
            continue;
        }
        let digit = b[i].is_ascii_digit();
        let start = i;
        while i < b.len() && !b"._-+~".contains(&b[i]) && b[i].is_ascii_digit() == digit {
            i += 1;
        }
        out.push(&v[start..i]);
    }
    out
}

pub fn compare(a: &str, b: &str) -> Ordering {
    let (pa, pb) = (pieces(a), pieces(b));
    for (x, y) in pa.iter().zip(&pb) {
        let xd = x.bytes().all(|c| c.is_ascii_digit());
        let yd = y.bytes().all(|c| c.is_ascii_digit());
        let o = match (xd, yd) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            // A number sorts after text: 1.0.1 > 1.0.beta.
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::compare;
    use std::cmp::Ordering::*;

    #[test]
    fn orders_like_people_do() {
        assert_eq!(compare("1.2", "1.10"), Less);
        assert_eq!(compare("1.2.0", "1.2"), Greater);
        assert_eq!(compare("3.0.20241101", "3.0.20240915"), Greater);
        assert_eq!(compare("2.0", "2.0"), Equal);
        assert_eq!(compare("2.00", "2.0"), Equal);
        assert_eq!(compare("1.0.beta", "1.0.1"), Less);
        assert_eq!(compare("v2", "v10"), Less);
    }
}
