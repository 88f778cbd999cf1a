//! AWS Secrets Manager's `GetSecretValue`, signed with the server's own AWS credentials
//! (Signature Version 4, the signer the data plane uses for its AWS targets).

use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::dataplane::credentials::sigv4::{Request, Signer};
use crate::policy::AwsSecretRef;

pub struct Client {
    http: reqwest::Client,
    /// The server's credentials: access key id, secret, session token.
    credentials: Option<(String, Zeroizing<String>, Option<Zeroizing<String>>)>,
    region: Option<String>,
    /// An endpoint other than AWS's own (a VPC endpoint, a local emulator).
    endpoint: Option<String>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "SecretString")]
    secret_string: Option<String>,
}

#[derive(Deserialize)]
struct Failure {
    #[serde(rename = "__type")]
    kind: Option<String>,
}

impl Client {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Some((
                id,
                Zeroizing::new(secret),
                var("AWS_SESSION_TOKEN").map(Zeroizing::new),
            )),
            _ => None,
        };
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client with the system's roots"),
            credentials,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint: var("AWS_ENDPOINT_URL_SECRETS_MANAGER").or_else(|| var("AWS_ENDPOINT_URL")),
        }
    }

    /// The secret's text: its `SecretString`, or the JSON member `field` of it.
    pub async fn get_secret(&self, secret: &AwsSecretRef) -> Result<Zeroizing<String>, String> {
        let Some((id, key, token)) = &self.credentials else {
            return Err(
                "the server has no AWS credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
                    .into(),
            );
        };
        let region = secret
            .region
            .as_deref()
            .or(self.region.as_deref())
            .ok_or("no region: give `region`, or AWS_REGION to the server")?;
        let endpoint = match &self.endpoint {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("https://secretsmanager.{region}.amazonaws.com"),
        };
        let url = reqwest::Url::parse(&format!("{endpoint}/"))
            .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
        let authority = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(format!("endpoint {endpoint:?} has no host")),
        };
        let body = serde_json::to_vec(&serde_json::json!({ "SecretId": secret.id }))
            .expect("JSON of a string");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "secretsmanager.GetSecretValue"),
        ];
        let signer = Signer::new(
            id,
            key,
            token.as_deref().map(|t| t.as_str()),
            region,
            "secretsmanager",
            false,
        );
        let signed = signer.sign(
            &Request {
                method: "POST",
                authority: &authority,
                path: url.path(),
                body: Some(&body),
                headers: &headers,
            },
            crate::base::clock::now_unix(),
        );
        let mut request = self.http.post(url).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        for (name, value) in signed {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("Secrets Manager: {e}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("Secrets Manager: {e}"))?;
        if !status.is_success() {
            // The error's type names the problem (ResourceNotFoundException, …); its
            // message is not echoed.
            let kind = serde_json::from_slice::<Failure>(&bytes)
                .ok()
                .and_then(|f| f.kind)
                .unwrap_or_default();
            return Err(format!("Secrets Manager answered {status} {kind}"));
        }
        let answer: Answer = serde_json::from_slice(&bytes)
            .map_err(|_| "Secrets Manager's answer is not GetSecretValue's".to_owned())?;
        let text = Zeroizing::new(
            answer
                .secret_string
                .ok_or("the secret has no SecretString (binary secrets are not read)")?,
        );
        let Some(field) = &secret.field else {
            return Ok(text);
        };
        let object: serde_json::Value = serde_json::from_str(&text)
            .map_err(|_| "the secret is not JSON; `field` needs a JSON object")?;
        match object.get(field) {
            Some(serde_json::Value::String(value)) => Ok(Zeroizing::new(value.clone())),
            Some(_) => Err(format!("member {field:?} of the secret is not a string")),
            None => Err(format!("the secret has no member {field:?}")),
        }
    }
}
