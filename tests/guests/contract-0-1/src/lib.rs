//! A handler built against contract 0.1.0 (the frozen `wit/released/0.1.0`), with plain
//! `wit-bindgen` and no SDK: the engine must keep running it unchanged. It uses every 0.1.0
//! interface and logs what each call answered, so a test can see each call reach the engine's
//! current implementation and the answer come back:
//!
//! - `properties`, `log`, `delivery` (handler name, attempt, event id);
//! - `keyfactor`: GET `OrchestratorJobs/JobHistory` for the job;
//! - `mail`: a message to the property `To`, when set;
//! - `http`: a POST of the job id to the property `Url`, when set.
//!
//! It fails when the job failed and the property `FailOnFailure` is `true`.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../../wit/released/0.1.0", world: "handler" });

    use jobhook::handler::log::Level;
    use jobhook::handler::types::{JobResult, Method};
    use jobhook::handler::{delivery, http, keyfactor, log, mail, properties};

    struct Contract01;

    fn info(text: &str) {
        log::log(Level::Info, text);
    }

    impl Guest for Contract01 {
        fn run_handler(context: jobhook::handler::types::JobContext) -> Result<(), String> {
            info(&format!(
                "0.1.0 handler {} attempt {} event {} job {} {:?} retries {}",
                delivery::handler_name(),
                delivery::attempt(),
                delivery::event_id().unwrap_or_else(|| "none".into()),
                context.job_id,
                context.job_result,
                context.current_retry_count,
            ));
            info(&format!("properties {}", properties::names().join(",")));

            let answer = keyfactor::send(&keyfactor::Request {
                method: Method::Get,
                path: "OrchestratorJobs/JobHistory".into(),
                query: vec![(
                    "pq.queryString".into(),
                    format!("JobId -eq \"{}\"", context.job_id),
                )],
                headers: vec![],
                body: None,
            });
            match answer {
                Ok(response) => info(&format!(
                    "keyfactor {} {} bytes",
                    response.status,
                    response.body.len()
                )),
                Err(e) => info(&format!("keyfactor refused {e:?}")),
            }

            if let Some(to) = properties::get("To") {
                let sent = mail::send(&mail::Message {
                    from: None,
                    to: vec![to],
                    cc: vec![],
                    subject: format!("job {}", context.job_id),
                    body: format!("{} ended {:?}", context.job_type, context.job_result),
                });
                info(&format!("mail {sent:?}"));
            }

            if let Some(url) = properties::get("Url") {
                let posted = http::send(&http::Request {
                    method: Method::Post,
                    url,
                    headers: vec![("content-type".into(), "text/plain".into())],
                    body: Some(context.job_id.clone().into_bytes()),
                });
                match posted {
                    Ok(response) => info(&format!("http {}", response.status)),
                    Err(e) => info(&format!("http refused {e:?}")),
                }
            }

            let fail = properties::get("FailOnFailure").as_deref() == Some("true");
            if fail && context.job_result == JobResult::Failure {
                return Err(format!("job {} failed", context.job_id));
            }
            Ok(())
        }
    }

    export!(Contract01);
}
