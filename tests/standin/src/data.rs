//! The stand-in's seeded data: JobHistory rows, certificates, agents and certificate stores in
//! the shapes of `reference/keyfactor.md` §5.1 and §6 (the sample handler's trace and the
//! Command API docs), consistent with the example contexts in `examples/*/contexts`.

use serde_json::{Value, json};

/// The orchestrator of the example contexts.
pub const AGENT_ID: &str = "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11";
/// Its name.
pub const AGENT_MACHINE: &str = "orchestrator.kftrain.lab";
/// The recurring inventory job of `examples/*/contexts/inventory.json`.
pub const INVENTORY_JOB_ID: &str = "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90";
/// The one-time management (add) job of `contexts/management-add.json`.
pub const MANAGEMENT_JOB_ID: &str = "426ec1ab-9d3e-4b8f-a2c6-71e5f0d4b9a3";
/// A one-time reenrollment job.
pub const REENROLLMENT_JOB_ID: &str = "32354394-5c1a-4f7e-8b2d-9e0f1a2b3c4d";
/// A PEM inventory job that keeps failing.
pub const FAILING_JOB_ID: &str = "7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60";
/// The IIS store the inventory job runs against.
pub const IIS_STORE_ID: &str = "b8054afc-2d3e-4f5a-8b6c-7d8e9f0a1b2c";
/// The PEM store of the failing job.
pub const PEM_STORE_ID: &str = "c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f";

/// The WinCert store type's inventory job type on this (imaginary) instance: the GUID of the
/// sample handler's trace (`reference/keyfactor.md` §1.2).
pub const WINCERT_INVENTORY: &str = "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f";
/// The WinCert management job type (the one the examples' contexts carry, as do the next).
pub const WINCERT_MANAGEMENT: &str = "4be14534-8a1f-4c3d-9e7b-2f6d0c5a8e19";
/// The WinCert reenrollment (enrollment) job type.
pub const WINCERT_REENROLLMENT: &str = "e868b3f8-2c4d-4b7a-a1e9-5d3f8c6b2a07";
/// A custom job type (`GET /JobTypes/Custom`).
pub const CUSTOM_JOB_TYPE_ID: &str = "3f2a1b0c-9d8e-4f7a-a6b5-c4d3e2f1a0b9";

/// Everything the stand-in serves. Public so tests can add or change rows before starting it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `GET OrchestratorJobs/JobHistory` rows.
    pub job_history: Vec<Value>,
    /// `GET Certificates/{id}` objects (matched on `Id`).
    pub certificates: Vec<Value>,
    /// `GET Agents/{id}` objects (matched on `AgentId`).
    pub agents: Vec<Value>,
    /// `GET CertificateStores/{id}` objects (matched on `Id`).
    pub stores: Vec<Value>,
    /// `GET CertificateStoreTypes` objects (the job-type fields of the API's store type).
    pub store_types: Vec<Value>,
    /// `GET JobTypes/Custom` objects.
    pub custom_job_types: Vec<Value>,
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset::seeded()
    }
}

/// One JobHistory row: `(JobId, JobType)`, `(OperationStart, OperationEnd)`,
/// `(Result, Status, Message)`, `(StorePath, ClientMachine)`.
fn history(
    id: u64,
    (job_id, job_type): (&str, &str),
    (start, end): (&str, Option<&str>),
    (result, status, message): (&str, &str, &str),
    (store_path, client_machine): (&str, &str),
) -> Value {
    json!({
        "JobHistoryId": id,
        "AgentMachine": AGENT_MACHINE,
        "JobId": job_id,
        "Schedule": if job_type.ends_with("Inventory") {
            json!({"Interval": {"Minutes": 1}})
        } else {
            json!({"Immediate": true})
        },
        "JobType": job_type,
        "OperationStart": start,
        "OperationEnd": end,
        "Message": message,
        "Result": result_number(result),
        "Status": status_number(status),
        "StorePath": store_path,
        "ClientMachine": client_machine,
    })
}

/// JobHistory `Result` as the API returns it (`reference/keyfactor.md` §3.1: 4 Failure,
/// 3 Warning, 2 Success, 0 Unknown).
pub fn result_number(name: &str) -> i64 {
    match name {
        "Success" => 2,
        "Warning" => 3,
        "Failure" => 4,
        _ => 0,
    }
}

/// JobHistory `Status` as the API returns it (§3.1: 0 Unknown, 1 Waiting, 2 InProcess,
/// 3 Completed, 4 Acknowledged, 5 CompletedWillRetry).
pub fn status_number(name: &str) -> i64 {
    match name {
        "Waiting" => 1,
        "InProcess" => 2,
        "Completed" => 3,
        "Acknowledged" => 4,
        "CompletedWillRetry" => 5,
        _ => 0,
    }
}

impl Dataset {
    /// The seeded data set.
    pub fn seeded() -> Self {
        let iis = "iistarget.kftrain.lab";
        let pem = "pemhost.kftrain.lab";
        let job_history = vec![
            history(
                2160,
                (FAILING_JOB_ID, "PEMInventory"),
                ("2023-05-05T23:50:00", Some("2023-05-05T23:50:04")),
                (
                    "Failure",
                    "CompletedWillRetry",
                    "Unable to open the store file /etc/ssl/app/certs.pem: permission denied",
                ),
                ("/etc/ssl/app/certs.pem", pem),
            ),
            history(
                2164,
                (FAILING_JOB_ID, "PEMInventory"),
                ("2023-05-06T00:05:00", Some("2023-05-06T00:05:03")),
                (
                    "Failure",
                    "CompletedWillRetry",
                    "Unable to open the store file /etc/ssl/app/certs.pem: permission denied",
                ),
                ("/etc/ssl/app/certs.pem", pem),
            ),
            history(
                2167,
                (MANAGEMENT_JOB_ID, "WinCertManagement"),
                ("2023-05-05T17:25:41", Some("2023-05-05T17:25:44")),
                ("Success", "Completed", ""),
                ("My", iis),
            ),
            history(
                2168,
                (INVENTORY_JOB_ID, "WinCertInventory"),
                ("2023-05-06T00:27:00", Some("2023-05-06T00:27:01")),
                ("Success", "Completed", ""),
                ("My", iis),
            ),
            history(
                2169,
                (INVENTORY_JOB_ID, "WinCertInventory"),
                ("2023-05-06T00:28:00", Some("2023-05-06T00:28:01")),
                ("Success", "Completed", ""),
                ("My", iis),
            ),
            history(
                2170,
                (INVENTORY_JOB_ID, "WinCertInventory"),
                ("2023-05-06T00:29:00", Some("2023-05-06T00:29:02")),
                ("Warning", "Completed", "1 certificate could not be read"),
                ("My", iis),
            ),
            history(
                2171,
                (INVENTORY_JOB_ID, "WinCertInventory"),
                ("2023-05-06T00:30:00", None),
                ("Unknown", "InProcess", ""),
                ("My", iis),
            ),
            history(
                2172,
                (REENROLLMENT_JOB_ID, "WinCertReenrollment"),
                ("2023-05-06T01:02:00", Some("2023-05-06T01:02:09")),
                ("Success", "Completed", ""),
                ("My", iis),
            ),
            history(
                2175,
                (FAILING_JOB_ID, "PEMInventory"),
                ("2023-05-06T00:20:00", Some("2023-05-06T00:20:03")),
                (
                    "Failure",
                    "CompletedWillRetry",
                    "Unable to open the store file /etc/ssl/app/certs.pem: permission denied",
                ),
                ("/etc/ssl/app/certs.pem", pem),
            ),
        ];
        let certificates = vec![
            json!({
                "Id": 14,
                "Thumbprint": "3A1F6C0E5B2D4F8A9C7E1B3D5F7A9C2E4B6D8F0A",
                "SerialNumber": "6D00000014A1B2C3D4E5F60000000000000014",
                "IssuedDN": "CN=www.kftrain.lab, O=Keyfactor Training, C=US",
                "IssuedCN": "www.kftrain.lab",
                "NotBefore": "2023-05-05T17:15:00Z",
                "NotAfter": "2024-05-05T17:15:00Z",
                "IssuerDN": "CN=KFTRAIN Issuing CA 1, DC=kftrain, DC=lab",
                "CertState": 1,
                "KeySizeInBits": 2048,
                "KeyType": 1,
                "Metadata": {"Owner": "pki-team@example.com"},
                "Locations": [{"StoreMachine": iis, "StorePath": "My", "StoreType": 5, "Alias": "3A1F6C0E5B2D4F8A9C7E1B3D5F7A9C2E4B6D8F0A"}]
            }),
            json!({
                "Id": 15,
                "Thumbprint": "9E8D7C6B5A4F3E2D1C0B9A8F7E6D5C4B3A2F1E0D",
                "SerialNumber": "6D00000015F6E5D4C3B2A10000000000000015",
                "IssuedDN": "CN=iistarget.kftrain.lab",
                "IssuedCN": "iistarget.kftrain.lab",
                "NotBefore": "2023-05-06T01:02:05Z",
                "NotAfter": "2024-05-06T01:02:05Z",
                "IssuerDN": "CN=KFTRAIN Issuing CA 1, DC=kftrain, DC=lab",
                "CertState": 1,
                "KeySizeInBits": 2048,
                "KeyType": 1,
                "Metadata": {},
                "Locations": []
            }),
        ];
        let agents = vec![json!({
            "AgentId": AGENT_ID,
            "ClientMachine": AGENT_MACHINE,
            "Username": "KFTRAIN\\SVC_Orchestrator",
            "AgentPlatform": 2,
            "Version": "10.4.0.0",
            "Status": 2,
            "LastSeen": "2023-05-06T00:30:00Z",
            "Capabilities": ["WinCert", "IISU", "PEM"],
            "Blueprint": null,
            "Thumbprint": "",
            "LegacyThumbprint": "",
            "AuthCertificateReenrollment": 0,
            "LastThumbprintUsed": "",
            "LastErrorCode": 0,
            "LastErrorMessage": null
        })];
        let stores = vec![
            json!({
                "Id": IIS_STORE_ID,
                "ContainerId": null,
                "ClientMachine": iis,
                "StorePath": "My",
                "CertStoreType": 5,
                "Approved": true,
                "CreateIfMissing": false,
                "Properties": "{}",
                "AgentId": AGENT_ID,
                "AgentAssigned": true,
                "InventorySchedule": {"Interval": {"Minutes": 1}}
            }),
            json!({
                "Id": PEM_STORE_ID,
                "ContainerId": null,
                "ClientMachine": pem,
                "StorePath": "/etc/ssl/app/certs.pem",
                "CertStoreType": 3,
                "Approved": true,
                "CreateIfMissing": false,
                "Properties": "{\"separatePrivateKey\":\"false\"}",
                "AgentId": AGENT_ID,
                "AgentAssigned": true,
                "InventorySchedule": {"Interval": {"Minutes": 15}}
            }),
        ];
        let store_types = vec![
            json!({
                "StoreType": 6, "Name": "IIS Personal", "ShortName": "WinCert",
                "Capability": "WinCert", "LocalStore": false, "SupportedOperations": {},
                "InventoryJobType": WINCERT_INVENTORY,
                "ManagementJobType": WINCERT_MANAGEMENT,
                "EnrollmentJobType": WINCERT_REENROLLMENT,
                "DiscoveryJobType": null
            }),
            // The C agent's built-in PEM capability GUIDs (§4).
            json!({
                "StoreType": 2, "Name": "PEM File", "ShortName": "PEM",
                "Capability": "PEM", "LocalStore": false, "SupportedOperations": {},
                "InventoryJobType": "a809ce1f-1eea-4738-a38e-15708c89c981",
                "ManagementJobType": "1d411b36-ae72-433f-9f3f-8593e836a1af",
                "EnrollmentJobType": "aa015d10-cffc-41f7-a9a4-c9615f6f3bdf",
                "DiscoveryJobType": "e98151de-53ad-4b99-b52a-f37118ec0c5c"
            }),
        ];
        let custom_job_types = vec![json!({
            "Id": CUSTOM_JOB_TYPE_ID,
            "JobTypeName": "RebootAfterAdd",
            "Description": "Restart the web server after a certificate was added",
            "JobTypeFields": [{"Name": "ServiceName", "Type": 1, "DefaultValue": "W3SVC", "Required": true}]
        })];
        Dataset {
            job_history,
            certificates,
            agents,
            stores,
            store_types,
            custom_job_types,
        }
    }
}
