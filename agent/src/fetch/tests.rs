//! Content-Range parsing, and credentials kept to the release server's origin.

use super::*;

#[test]
fn content_range() {
    assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
    assert_eq!(parse_content_range("bytes */1000"), None);
    assert_eq!(parse_content_range("items 0-9/10"), None);
}

#[test]
fn credentials_stay_on_the_release_origin() {
    let base = "https://updates.example.com/azl3/";
    assert!(same_origin(
        "https://updates.example.com/azl3/2.0.full.uap",
        base
    ));
    assert!(same_origin("https://UPDATES.example.com:443/other", base));
    assert!(!same_origin(
        "http://updates.example.com/azl3/2.0.full.uap",
        base
    ));
    assert!(!same_origin("https://updates.example.com:8443/x", base));
    assert!(!same_origin(
        "https://updates.example.com.evil.test/x",
        base
    ));
    assert!(!same_origin(
        "https://evil.test/?https://updates.example.com/",
        base
    ));
    assert!(!same_origin("file:///root/secret", base));
    assert!(!same_origin("/root/secret", base));
}
