//! Maintenance windows: when a node may reboot. Each window starts on some weekdays at
//! a wall-clock time in one time zone and lasts a length; a window may run past
//! midnight (it belongs to the day it starts). Times are wall-clock: on the day the
//! clocks spring forward a start inside the gap is read with the offset before the
//! gap (02:30 becomes 03:30), and on the day they fall back a start in the repeated
//! hour means its first occurrence (jiff's "compatible" rule, the one RFC 5545
//! calendars use). Ends are wall-clock too, so such a night's window is an hour
//! shorter or longer in real time.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;

/// A window as written in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Weekdays the window starts on: `mon` … `sun` (or full names).
    pub days: Vec<String>,
    /// Local start time, `HH:MM`.
    pub start: String,
    /// How long it lasts, e.g. `3h` or `90m` (at most a week).
    pub length: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("window {index}: {day:?} is not a weekday (mon, tue, … sun)")]
    Day { index: usize, day: String },
    #[error("window {index}: names no days")]
    NoDays { index: usize },
    #[error("window {index}: start {start:?} is not a time of day (HH:MM)")]
    Start { index: usize, start: String },
    #[error("window {index}: length {length:?} is not a duration between 1 minute and 7 days (e.g. 3h, 90m)")]
    Length { index: usize, length: String },
    #[error("time zone {name:?} is not known to this node's time zone database")]
    TimeZone { name: String },
}

#[derive(Debug, Clone)]
struct Window {
    days: Vec<Weekday>,
    start: Time,
    length: SignedDuration,
}

/// Validated windows in their time zone.
#[derive(Debug, Clone)]
pub struct Windows {
    tz: TimeZone,
    list: Vec<Window>,
}

/// One occurrence of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: Timestamp,
    pub end: Timestamp,
}

fn weekday(s: &str) -> Option<Weekday> {
    let s = s.to_ascii_lowercase();
    let all = [
        ("mon", Weekday::Monday),
        ("tue", Weekday::Tuesday),
        ("wed", Weekday::Wednesday),
        ("thu", Weekday::Thursday),
        ("fri", Weekday::Friday),
        ("sat", Weekday::Saturday),
        ("sun", Weekday::Sunday),
    ];
    all.iter().find_map(|(short, d)| {
        let full = format!("{:?}", d).to_ascii_lowercase();
        (s == *short || s == full).then_some(*d)
    })
}

/// Parses a duration such as `6h`, `90m`, `1h30m` or `PT6H`.
pub fn parse_duration(s: &str) -> Option<SignedDuration> {
    s.trim().parse::<SignedDuration>().ok()
}

impl Windows {
    /// `time_zone`: an IANA name, or `localtime` for the node's own setting.
    pub fn new(time_zone: &str, list: &[WindowConfig]) -> Result<Self, WindowError> {
        // `localtime` must really be known: jiff's `system()` would fall back to UTC
        // without a word, and every window would move by the offset.
        let tz = if time_zone == "localtime" {
            TimeZone::try_system().map_err(|_| WindowError::TimeZone {
                name: "localtime (the node's /etc/localtime or TZ)".into(),
            })?
        } else {
            TimeZone::get(time_zone).map_err(|_| WindowError::TimeZone {
                name: time_zone.to_owned(),
            })?
        };
        let list = list
            .iter()
            .enumerate()
            .map(|(index, w)| {
                if w.days.is_empty() {
                    return Err(WindowError::NoDays { index });
                }
                let days = w
                    .days
                    .iter()
                    .map(|d| {
                        weekday(d).ok_or_else(|| WindowError::Day {
                            index,
                            day: d.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let start =
                    Time::strptime("%H:%M", w.start.trim()).map_err(|_| WindowError::Start {
                        index,
                        start: w.start.clone(),
                    })?;
                let length = parse_duration(&w.length)
                    .filter(|l| {
                        *l >= SignedDuration::from_mins(1) && *l <= SignedDuration::from_hours(168)
                    })
                    .ok_or_else(|| WindowError::Length {
                        index,
                        length: w.length.clone(),
                    })?;
                Ok(Window {
                    days,
                    start,
                    length,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { tz, list })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Occurrences starting on local dates from a week before `now` to a week after,
    /// which covers every window open at `now` and the next one to open.
    fn occurrences(&self, now: Timestamp) -> Vec<Span> {
        let today = self.tz.to_datetime(now).date();
        let mut out = Vec::new();
        let mut day = today;
        for _ in 0..7 {
            match day.yesterday() {
                Ok(d) => day = d,
                Err(_) => break,
            }
        }
        for _ in 0..15 {
            for w in &self.list {
                if let Some(s) = self.occurrence(w, day) {
                    out.push(s);
                }
            }
            match day.tomorrow() {
                Ok(d) => day = d,
                Err(_) => break,
            }
        }
        out
    }

    fn occurrence(&self, w: &Window, day: Date) -> Option<Span> {
        if !w.days.contains(&day.weekday()) {
            return None;
        }
        let start_local = day.to_datetime(w.start);
        // The end is wall-clock too: a 02:00+3h window ends at 05:00 even on the
        // nights the clocks change.
        let end_local = start_local.checked_add(w.length).ok()?;
        let start = self.tz.to_timestamp(start_local).ok()?;
        let end = self.tz.to_timestamp(end_local).ok()?;
        (end > start).then_some(Span { start, end })
    }

    /// The window open at `now`, if any (the one that stays open longest).
    pub fn current(&self, now: Timestamp) -> Option<Span> {
        self.occurrences(now)
            .into_iter()
            .filter(|s| s.start <= now && now < s.end)
            .max_by_key(|s| s.end)
    }

    /// The next window to open after `now`.
    pub fn next(&self, now: Timestamp) -> Option<Span> {
        self.occurrences(now)
            .into_iter()
            .filter(|s| s.start > now)
            .min_by_key(|s| s.start)
    }

    /// The window's time zone name, for status.
    pub fn time_zone(&self) -> String {
        self.tz.iana_name().unwrap_or("local").to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(days: &[&str], start: &str, length: &str) -> WindowConfig {
        WindowConfig {
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            start: start.into(),
            length: length.into(),
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn a_window_across_midnight_belongs_to_its_first_day() {
        // Saturdays 22:00 for 4 hours, in UTC.
        let w = Windows::new("UTC", &[cfg(&["sat"], "22:00", "4h")]).expect("valid");
        // 2026-11-28 is a Saturday.
        assert_eq!(w.current(ts("2026-11-28T21:59:59Z")), None);
        let open = Span {
            start: ts("2026-11-28T22:00:00Z"),
            end: ts("2026-11-29T02:00:00Z"),
        };
        assert_eq!(w.current(ts("2026-11-28T22:00:00Z")), Some(open));
        // Sunday 01:30 is still Saturday's window.
        assert_eq!(w.current(ts("2026-11-29T01:30:00Z")), Some(open));
        assert_eq!(w.current(ts("2026-11-29T02:00:00Z")), None);
        assert_eq!(w.next(ts("2026-11-26T12:00:00Z")), Some(open));
        assert_eq!(
            w.next(ts("2026-11-29T02:00:00Z")).map(|s| s.start),
            Some(ts("2026-12-05T22:00:00Z"))
        );
    }

    #[test]
    fn windows_follow_the_wall_clock_across_dst() {
        let w = Windows::new(
            "Europe/Berlin",
            &[cfg(&["sun"], "02:30", "2h"), cfg(&["sat"], "12:00", "1h")],
        )
        .expect("valid");
        // Spring forward 2027-03-28: 02:00 CET jumps to 03:00 CEST, so 02:30 does not
        // exist; it is read with the offset before the gap (02:30+01 = 03:30 CEST,
        // 01:30Z), and the window still ends at 04:30 CEST: one real hour.
        let spring = w.next(ts("2027-03-27T13:00:00Z")).expect("next");
        assert_eq!(spring.start, ts("2027-03-28T01:30:00Z"));
        assert_eq!(spring.end, ts("2027-03-28T02:30:00Z"));
        // Fall back 2026-10-25: 02:30 happens twice; the first (CEST, 00:30Z) opens it
        // and 04:30 CET (03:30Z) ends it, three real hours later.
        let fall = w.next(ts("2026-10-24T13:00:00Z")).expect("next");
        assert_eq!(fall.start, ts("2026-10-25T00:30:00Z"));
        assert_eq!(fall.end, ts("2026-10-25T03:30:00Z"));
        // An ordinary week: CET is UTC+1 in winter, Saturday noon is 11:00Z.
        let sat = w.next(ts("2026-11-27T00:00:00Z")).expect("next");
        assert_eq!(sat.start, ts("2026-11-28T11:00:00Z"));
        assert!(w.current(ts("2026-11-28T11:30:00Z")).is_some());
        assert!(w.current(ts("2026-11-28T12:30:00Z")).is_none());
    }

    #[test]
    fn long_windows_and_windows_across_a_clock_change() {
        // Friday 18:00 for 60 hours: the whole weekend, still open on Sunday.
        let w = Windows::new("UTC", &[cfg(&["fri"], "18:00", "60h")]).expect("valid");
        let s = w
            .current(ts("2026-11-29T20:00:00Z"))
            .expect("open on Sunday");
        assert_eq!(s.start, ts("2026-11-27T18:00:00Z"));
        assert_eq!(s.end, ts("2026-11-30T06:00:00Z"));
        // New York, Saturday 2026-10-31 23:00 for 4 h: the clocks fall back at 02:00 on
        // Sunday, so the wall-clock end (03:00 EST) is five real hours later.
        let w = Windows::new("America/New_York", &[cfg(&["sat"], "23:00", "4h")]).expect("valid");
        let s = w.next(ts("2026-10-31T12:00:00Z")).expect("next");
        assert_eq!(s.start, ts("2026-11-01T03:00:00Z"));
        assert_eq!(s.end, ts("2026-11-01T08:00:00Z"));
        assert!(w.current(ts("2026-11-01T07:30:00Z")).is_some());
    }

    #[test]
    fn overlapping_windows_report_the_longest() {
        let w = Windows::new(
            "UTC",
            &[
                cfg(&["mon", "Tuesday"], "01:00", "1h"),
                cfg(&["MON"], "01:30", "2h"),
            ],
        )
        .expect("valid");
        // 2026-11-30 is a Monday.
        let s = w.current(ts("2026-11-30T01:45:00Z")).expect("open");
        assert_eq!(s.end, ts("2026-11-30T03:30:00Z"));
    }

    #[test]
    fn bad_windows_are_named() {
        let e = Windows::new("UTC", &[cfg(&["funday"], "01:00", "1h")]).expect_err("day");
        assert!(e.to_string().contains("funday"), "{e}");
        let e = Windows::new("UTC", &[cfg(&["mon"], "25:00", "1h")]).expect_err("start");
        assert!(e.to_string().contains("25:00"), "{e}");
        let e = Windows::new("UTC", &[cfg(&["mon"], "01:00", "9d")]).expect_err("length");
        assert!(e.to_string().contains("9d"), "{e}");
        let e = Windows::new("UTC", &[cfg(&["mon"], "01:00", "banana")]).expect_err("length");
        assert!(e.to_string().contains("banana"), "{e}");
        let e = Windows::new("Mars/Olympus", &[]).expect_err("tz");
        assert!(e.to_string().contains("Mars/Olympus"), "{e}");
        assert!(matches!(
            Windows::new("UTC", &[cfg(&[], "01:00", "1h")]),
            Err(WindowError::NoDays { index: 0 })
        ));
    }
}
