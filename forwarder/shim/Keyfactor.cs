// TEST-ONLY stand-in for the types of Keyfactor's NuGet packages
// Keyfactor.Platform.IOrchestratorJobCompleteHandler and Keyfactor.Orchestrators.Common, so the
// forwarder can be compiled and exercised under Mono where those packages cannot be restored.
// Shapes follow Keyfactor's published reference (seeds/000 and reference/keyfactor.md §1, §3):
// the context has public FIELDS, not properties. Never ship this assembly.

using System;
using System.Net.Http;
using Keyfactor.Orchestrators.Common.Enums;

namespace Keyfactor.Orchestrators.Common.Enums
{
    /// <summary>
    /// Final status of a job. 0/2/3/4 are Keyfactor's documented numbers; 1 (InProcess) is the
    /// agent protocol's JOB_COMP_PROC and unverified as a member of the .NET enum.
    /// </summary>
    public enum OrchestratorJobStatusJobResult
    {
        Unknown = 0,
        InProcess = 1,
        Success = 2,
        Warning = 3,
        Failure = 4,
    }

    /// <summary>
    /// Operation of a job, in Keyfactor's declaration order (0-5 verified against the agent
    /// protocol, 6-9 inferred from that order).
    /// </summary>
    public enum CertStoreOperationType
    {
        Unknown = 0,
        Inventory = 1,
        Add = 2,
        Remove = 3,
        Create = 4,
        CreateAdd = 5,
        Reenrollment = 6,
        Discovery = 7,
        SetPassword = 8,
        FetchLogs = 9,
    }
}

namespace Keyfactor.Platform.Extensions
{
    /// <summary>Keyfactor extensibility point run after an orchestrator job completes.</summary>
    public interface IOrchestratorJobCompleteHandler
    {
        /// <summary>Comma-separated job type GUIDs this handler runs for.</summary>
        string JobTypes { get; }

        /// <summary>Called after an agent job completes.</summary>
        bool RunHandler(OrchestratorJobCompleteHandlerContext context);
    }

    /// <summary>Agent and job information given to the handler (public fields, as in Keyfactor's).</summary>
    public class OrchestratorJobCompleteHandlerContext
    {
        public Guid AgentId;
        public string Username;
        public string ClientMachine;
        public OrchestratorJobStatusJobResult JobResult;
        public Guid JobId;
        public string JobType;
        public Guid JobTypeId;
        public CertStoreOperationType OperationType;
        public int? CertificateId;
        public DateTime? RequestTimestamp;
        public int CurrentRetryCount;
        public HttpClient Client;

        public OrchestratorJobCompleteHandlerContext()
        {
        }
    }
}
