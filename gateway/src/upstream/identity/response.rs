//! Token endpoint answers: the token and how long it lives, or the endpoint's error description.
//!
//! The providers disagree on the lifetime: IMDS sends `expires_in` and `expires_on` as strings,
//! Microsoft Entra ID sends `expires_in` as a number, App Service 2019-08-01 sends only
//! `expires_on` (epoch seconds as a string), and older App Service versions sent `expires_on` as a
//! date such as `06/20/2019 02:57:58 +00:00`. All of them are accepted; `expires_in` wins because it
//! does not depend on the two clocks agreeing.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{AccessToken, Secret};

/// The longest error description passed on; Entra's carry a trace id and a timestamp after the reason.
const MAX_DESCRIPTION_CHARS: usize = 400;

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<Seconds>,
    #[serde(default)]
    expires_on: Option<Seconds>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(f64),
    Text(String),
}

/// Parses a 2xx answer; `now` is the time since the Unix epoch, for an absolute `expires_on`.
/// Errors never quote the token.
pub fn parse_token(body: &[u8], now: Duration) -> Result<AccessToken, String> {
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|e| {
        format!("not a JSON token answer with access_token and expires_in/expires_on ({})", category(&e))
    })?;
    if answer.access_token.trim().is_empty() {
        return Err("the access_token is empty".to_owned());
    }
    let expires_in = match (&answer.expires_in, &answer.expires_on) {
        (Some(seconds), _) => {
            let seconds =
                number(seconds).ok_or_else(|| format!("expires_in is not a number of seconds: {}", shown(seconds)))?;
            seconds_to_duration(seconds).ok_or_else(|| format!("expires_in must be positive, got {seconds}"))?
        }
        (None, Some(on)) => {
            let epoch = number(on)
                .or_else(|| match on {
                    Seconds::Text(text) => parse_date(text).map(|secs| secs as f64),
                    Seconds::Number(_) => None,
                })
                .ok_or_else(|| {
                    format!(
                        "expires_on is neither epoch seconds nor a date like \"06/20/2019 02:57:58 +00:00\": {}",
                        shown(on)
                    )
                })?;
            seconds_to_duration(epoch - now.as_secs_f64()).ok_or_else(|| {
                format!(
                    "the token expired already (expires_on {epoch} is not after this host's clock: check the clock)"
                )
            })?
        }
        (None, None) => return Err("the answer has neither expires_in nor expires_on".to_owned()),
    };
    Ok(AccessToken { secret: Secret::new(answer.access_token.trim()), expires_in })
}

fn number(seconds: &Seconds) -> Option<f64> {
    match seconds {
        Seconds::Number(n) => Some(*n),
        Seconds::Text(text) => text.trim().parse::<f64>().ok(),
    }
    .filter(|n| n.is_finite())
}

fn seconds_to_duration(seconds: f64) -> Option<Duration> {
    (seconds > 0.0).then(|| Duration::try_from_secs_f64(seconds).ok()).flatten()
}

fn shown(seconds: &Seconds) -> String {
    match seconds {
        Seconds::Number(n) => n.to_string(),
        Seconds::Text(text) => format!("{:?}", text.chars().take(40).collect::<String>()),
    }
}

/// serde_json's kind of failure, without its message (which may quote the input).
fn category(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not JSON",
        serde_json::error::Category::Data => "missing or mistyped fields",
    }
}

/// `MM/DD/YYYY HH:MM:SS [AM|PM] +HH:MM` (App Service before 2019-08-01) as epoch seconds.
fn parse_date(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let (date, time, meridiem, offset) = match parts.as_slice() {
        [date, time, offset] => (*date, *time, None, *offset),
        [date, time, meridiem, offset] => (*date, *time, Some(*meridiem), *offset),
        _ => return None,
    };
    let fields = |text: &str, separator: char| -> Option<Vec<i64>> {
        text.split(separator).map(|n| n.parse::<i64>().ok()).collect()
    };
    let [month, day, year] = fields(date, '/')?[..] else { return None };
    let [mut hour, minute, second] = fields(time, ':')?[..] else { return None };
    match meridiem.map(str::to_ascii_uppercase).as_deref() {
        None if hour <= 23 => {}
        Some("AM") if (1..=12).contains(&hour) => hour %= 12,
        Some("PM") if (1..=12).contains(&hour) => hour = hour % 12 + 12,
        _ => return None,
    }
    let valid = (1..=12).contains(&month) && (1..=31).contains(&day) && minute <= 59 && second <= 60;
    let (sign, offset) = match offset.split_at_checked(1)? {
        ("+", rest) => (1, rest),
        ("-", rest) => (-1, rest),
        _ => return None,
    };
    let digits = offset.replace(':', "");
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (offset_hours, offset_minutes): (i64, i64) = (digits[..2].parse().ok()?, digits[2..].parse().ok()?);
    valid.then(|| {
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
            - sign * (offset_hours * 3600 + offset_minutes * 60)
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The endpoint's own explanation of an error answer, on one line and bounded: Entra's and IMDS's
/// `error_description`, App Service's `message`, or the body's text.
pub fn error_description(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(value) => {
            let candidates = [
                &value["error_description"],
                &value["message"],
                &value["Message"],
                &value["error"]["message"],
                &value["error"],
            ];
            candidates.iter().find_map(|v| v.as_str()).map(str::to_owned).unwrap_or_else(|| value.to_string())
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut chars = one_line.chars();
    let mut bounded: String = chars.by_ref().take(MAX_DESCRIPTION_CHARS).collect();
    if chars.next().is_some() {
        bounded.push('…');
    }
    bounded
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Duration = Duration::from_secs(1_700_000_000);

    fn lifetime(body: &str) -> Result<u64, String> {
        parse_token(body.as_bytes(), NOW).map(|t| t.expires_in.as_secs())
    }

    #[test]
    fn expires_in_as_number_or_string() {
        assert_eq!(lifetime(r#"{"access_token":"t","expires_in":3599}"#), Ok(3599));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_in":"3599"}"#), Ok(3599));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_in":" 86399 ","expires_on":"1"}"#), Ok(86399));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_in":3599.0}"#), Ok(3599));
        let token = parse_token(br#"{"access_token":"abc","expires_in":60}"#, NOW).expect("token");
        assert_eq!(token.secret.expose(), "abc");
        assert!(!format!("{token:?}").contains("abc"), "Debug hides the token");
    }

    #[test]
    fn expires_on_as_epoch_number_string_or_date() {
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":1700000600}"#), Ok(600));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":"1700000600"}"#), Ok(600));
        // 2023-11-14 22:13:20 UTC is NOW; ten minutes later, in the old App Service format.
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":"11/14/2023 22:23:20 +00:00"}"#), Ok(600));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":"11/14/2023 10:23:20 PM +00:00"}"#), Ok(600));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":"11/14/2023 11:23:20 PM +01:00"}"#), Ok(600));
        assert_eq!(lifetime(r#"{"access_token":"t","expires_on":"11/14/2023 21:23:20 -0100"}"#), Ok(600));
    }

    #[test]
    fn dates_match_the_calendar() {
        assert_eq!(parse_date("06/20/2019 02:57:58 +00:00"), Some(1_560_999_478));
        assert_eq!(parse_date("9/14/2017 12:00:00 AM +00:00"), Some(1_505_347_200));
        assert_eq!(parse_date("02/29/2000 11:59:59 PM +00:00"), Some(951_868_799));
        assert_eq!(parse_date("01/01/1970 00:00:00 +00:00"), Some(0));
        for bad in ["13/01/2020 00:00:00 +00:00", "01/01/2020 25:00:00 +00:00", "01/01/2020 00:00:00", "tomorrow"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert_eq!(parse_date("01/01/2020 13:00:00 PM +00:00"), None);
    }

    #[test]
    fn unusable_answers_are_explained_without_the_token() {
        let cases = [
            (r#"{"access_token":"SECRET","expires_in":0}"#, "expires_in must be positive"),
            (r#"{"access_token":"SECRET","expires_in":"soon"}"#, "expires_in is not a number"),
            (
                r#"{"access_token":"SECRET","expires_on":"next tuesday"}"#,
                "expires_on is neither epoch seconds nor a date",
            ),
            (r#"{"access_token":"SECRET","expires_on":"1699999999"}"#, "the token expired already"),
            (r#"{"access_token":"SECRET"}"#, "neither expires_in nor expires_on"),
            (r#"{"access_token":"","expires_in":5}"#, "the access_token is empty"),
            (r#"{"token":"SECRET","expires_in":5}"#, "missing or mistyped fields"),
            ("SECRET", "not JSON"),
        ];
        for (body, expected) in cases {
            let error = parse_token(body.as_bytes(), NOW).expect_err(body);
            assert!(error.contains(expected), "{body}: {error}");
            assert!(!error.contains("SECRET"), "{body}: {error}");
        }
    }

    #[test]
    fn error_descriptions_of_each_provider() {
        let entra =
            br#"{"error":"invalid_client","error_description":"AADSTS700016: Application not found.\r\nTrace ID: 1"}"#;
        assert_eq!(error_description(entra), "AADSTS700016: Application not found. Trace ID: 1");
        let imds = br#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        assert_eq!(error_description(imds), "Identity not found");
        assert_eq!(error_description(br#"{"statusCode":400,"message":"No identity"}"#), "No identity");
        assert_eq!(error_description(br#"{"error":{"code":"x","message":"nested"}}"#), "nested");
        assert_eq!(error_description(br#"{"error":"only_a_code"}"#), "only_a_code");
        assert_eq!(error_description(b"Bad Gateway\n"), "Bad Gateway");
        let long = "x".repeat(1000);
        assert_eq!(error_description(long.as_bytes()).chars().count(), MAX_DESCRIPTION_CHARS + 1);
    }
}
