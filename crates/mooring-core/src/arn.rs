//! ARN construction for the configured account and region.
//!
//! Every service builds its resource ARNs through [`Arns`] so that the account id and region
//! from the configuration appear everywhere consistently.

/// Builds `arn:aws:<service>:<region>:<account>:<resource>` strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arns {
    pub account_id: String,
    pub region: String,
}

impl Arns {
    pub fn new(account_id: impl Into<String>, region: impl Into<String>) -> Self {
        Arns {
            account_id: account_id.into(),
            region: region.into(),
        }
    }

    /// The ARN of `resource` (for example `thing/my-thing` or `rule/my-rule`) in `service`.
    pub fn arn(&self, service: &str, resource: &str) -> String {
        format!(
            "arn:aws:{service}:{}:{}:{resource}",
            self.region, self.account_id
        )
    }

    /// Splits an ARN into its six parts, or `None` when it is not one.
    pub fn parse(arn: &str) -> Option<ParsedArn<'_>> {
        let mut parts = arn.splitn(6, ':');
        let (prefix, partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if prefix != "arn" || partition.is_empty() || service.is_empty() {
            return None;
        }
        Some(ParsedArn {
            partition,
            service,
            region,
            account,
            resource,
        })
    }
}

/// The parts of an ARN, borrowed from the original string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedArn<'a> {
    pub partition: &'a str,
    pub service: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub resource: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses() {
        let arns = Arns::new("123456789012", "eu-west-1");
        let arn = arns.arn("events", "event-bus/default");
        assert_eq!(
            arn,
            "arn:aws:events:eu-west-1:123456789012:event-bus/default"
        );
        let parsed = Arns::parse(&arn).unwrap();
        assert_eq!(parsed.service, "events");
        assert_eq!(parsed.resource, "event-bus/default");
        let with_colons = Arns::parse("arn:aws:iot:us-east-1:1:rule:a:b").unwrap();
        assert_eq!(with_colons.resource, "rule:a:b");
        assert!(Arns::parse("not-an-arn").is_none());
    }
}
