//! `log-context`: the minimal job complete handler. It logs every field of the job context at
//! info level, then how the event arrived and Keyfactor's message about the job (when the engine
//! has one), and succeeds; its only capability is `log`.

use jobhook_sdk::{Context, Handler, Result, delivery, export_handler, info};

/// Logs the context, one line per field, using the .NET field names, then the delivery's
/// `Source` and `Message`.
pub struct LogContext;

impl Handler for LogContext {
    fn run(ctx: &Context) -> Result<()> {
        info!("AgentId: {}", ctx.agent_id);
        info!("Username: {}", ctx.username);
        info!("ClientMachine: {}", ctx.client_machine);
        info!("JobResult: {}", ctx.job_result);
        info!("JobId: {}", ctx.job_id);
        info!("JobType: {}", ctx.job_type);
        info!("JobTypeId: {}", ctx.job_type_id);
        info!("OperationType: {}", ctx.operation_type);
        info!(
            "CertificateId: {}",
            ctx.certificate_id
                .map_or("null".into(), |id| id.to_string())
        );
        info!(
            "RequestTimestamp: {}",
            ctx.request_timestamp
                .map_or("null".into(), |t| t.to_rfc3339())
        );
        info!("CurrentRetryCount: {}", ctx.current_retry_count);
        info!("Source: {}", delivery::source());
        info!(
            "Message: {}",
            delivery::message().unwrap_or_else(|| "null".into())
        );
        Ok(())
    }
}

export_handler!(LogContext);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::log::Level;
    use jobhook_sdk::testing::{self, MockHost};

    #[test]
    fn logs_every_field_of_the_sample_context() {
        let ctx = testing::context_from_json(include_str!("../contexts/sample.json"))
            .expect("contexts/sample.json is a valid context");

        let host = MockHost::new().install();
        assert_eq!(testing::run_handler::<LogContext>(&ctx), Ok(()));

        let lines = host.logs_at(Level::Info);
        assert_eq!(
            lines,
            [
                "AgentId: fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11",
                r"Username: KFTRAIN\SVC_Orchestrator",
                "ClientMachine: orchestrator.kftrain.lab",
                "JobResult: Success",
                "JobId: 32354394-4f6a-4c1e-b8d2-6a0f9e3c7b15",
                "JobType: WinCertReenrollment",
                "JobTypeId: e868b3f8-2c4d-4b7a-a1e9-5d3f8c6b2a07",
                "OperationType: Unknown",
                "CertificateId: 15",
                "RequestTimestamp: 2023-05-05T17:31:12+00:00",
                "CurrentRetryCount: 0",
                "Source: direct",
                "Message: null",
            ]
        );
        assert_eq!(host.logs().len(), 13, "nothing logged at other levels");
    }

    #[test]
    fn absent_optionals_log_as_null() {
        let host = MockHost::new().install();
        let ctx = Context {
            certificate_id: None,
            request_timestamp: None,
            ..testing::context()
        };
        assert_eq!(testing::run_handler::<LogContext>(&ctx), Ok(()));
        assert!(host.logged("CertificateId: null"));
        assert!(host.logged("RequestTimestamp: null"));
        assert!(host.logged("Message: null"));
    }

    #[test]
    fn a_poller_event_logs_its_source_and_keyfactors_message() {
        let host = MockHost::new()
            .source(delivery::Source::Poller)
            .message("Unable to open the store file")
            .install();
        assert_eq!(
            testing::run_handler::<LogContext>(&testing::context()),
            Ok(())
        );
        assert!(host.logged("Source: poller"));
        assert!(host.logged("Message: Unable to open the store file"));
    }
}
