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
#if KEYFACTOR_RENUMBERED
    // TEST-ONLY variant (build.sh, "renum"): the same member names with other numbers, plus a
    // member the engine does not know, because Keyfactor documents the names and the numbers
    // are partly inferred (reference/keyfactor.md §3). The forwarder must send a known name as
    // the name whatever its number, and only an unknown one as its number.

    /// <summary>Final status of a job, renumbered; Pending is a member the engine does not know.</summary>
    public enum OrchestratorJobStatusJobResult
    {
        Unknown = 0,
        Success = 1,
        Warning = 2,
        Failure = 3,
        Pending = 4,
        InProcess = 5,
    }

    /// <summary>Operation of a job, renumbered; Rotate is a member the engine does not know.</summary>
    public enum CertStoreOperationType
    {
        Unknown = 0,
        Add = 1,
        Remove = 2,
        Inventory = 3,
        CreateAdd = 4,
        Create = 5,
        FetchLogs = 6,
        SetPassword = 7,
        Discovery = 8,
        Reenrollment = 9,
        Rotate = 10,
    }
#else
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
#endif
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
