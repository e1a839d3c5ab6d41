//! The wire formats: SMD's, BSS's and OpenCHAMI cloud-init's JSON shapes,
//! field for field, so that their clients and scripts work unchanged, plus
//! the `ochami discover static` node list that `load` reads.
//!
//! Field names follow the services they copy (`ID`, `MACAddress` in SMD,
//! lowercase and dashes in BSS); optional fields are skipped when empty so
//! that answers look like theirs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A JSON object, as BSS and cloud-init keep meta-data: free-form by design
/// (it is what the node's cloud-init reads), so not typed further here.
pub type CloudData = serde_json::Map<String, serde_json::Value>;

/// An SMD component (`/hsm/v2/State/Components`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// Its xname.
    #[serde(rename = "ID")]
    pub id: String,
    /// HMS type (`Node`, …); derived from the xname when not given.
    #[serde(rename = "Type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// HMS state (`Ready`, `On`, `Off`, `Empty`, …).
    #[serde(rename = "State", default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// HMS flag (`OK`, `Warning`, …).
    #[serde(rename = "Flag", default, skip_serializing_if = "String::is_empty")]
    pub flag: String,
    /// Whether it is enabled.
    #[serde(rename = "Enabled", default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Software status.
    #[serde(
        rename = "SoftwareStatus",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub software_status: String,
    /// Role (`Compute`, `Management`, …).
    #[serde(rename = "Role", default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// Sub-role.
    #[serde(rename = "SubRole", default, skip_serializing_if = "String::is_empty")]
    pub sub_role: String,
    /// Node ID, for nodes.
    #[serde(rename = "NID", default, skip_serializing_if = "Option::is_none")]
    pub nid: Option<i64>,
    /// Subtype.
    #[serde(rename = "Subtype", default, skip_serializing_if = "String::is_empty")]
    pub subtype: String,
    /// Network type (`Sling`, …).
    #[serde(rename = "NetType", default, skip_serializing_if = "String::is_empty")]
    pub net_type: String,
    /// Architecture (`X86`, `ARM`, …).
    #[serde(rename = "Arch", default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    /// Hardware class (`River`, `Mountain`, …).
    #[serde(rename = "Class", default, skip_serializing_if = "String::is_empty")]
    pub class: String,
}

/// `POST /hsm/v2/State/Components` and the answer to the list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentArray {
    /// The components.
    #[serde(rename = "Components", default)]
    pub components: Vec<Component>,
    /// SMD's `Force` (accepted; ferry always writes).
    #[serde(rename = "Force", default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// `PUT /hsm/v2/State/Components/{xname}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentPut {
    /// The component.
    #[serde(rename = "Component")]
    pub component: Component,
    /// SMD's `Force` (accepted; ferry always writes).
    #[serde(rename = "Force", default)]
    pub force: bool,
}

/// One address of an EthernetInterface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAddressMapping {
    /// The address.
    #[serde(rename = "IPAddress")]
    pub ip_address: String,
    /// The network's name, if any.
    #[serde(rename = "Network", default, skip_serializing_if = "String::is_empty")]
    pub network: String,
}

/// An SMD EthernetInterface (`/hsm/v2/Inventory/EthernetInterfaces`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EthernetInterface {
    /// The MAC, lowercase without colons (set by the service).
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Free text.
    #[serde(rename = "Description", default)]
    pub description: String,
    /// The MAC address.
    #[serde(rename = "MACAddress", default)]
    pub mac_address: String,
    /// When it last changed, RFC 3339 (set by the service).
    #[serde(rename = "LastUpdate", default)]
    pub last_update: String,
    /// The xname of the component it belongs to.
    #[serde(rename = "ComponentID", default)]
    pub component_id: String,
    /// The component's type (set by the service from the xname).
    #[serde(rename = "Type", default)]
    pub kind: String,
    /// Its addresses.
    #[serde(rename = "IPAddresses", default)]
    pub ip_addresses: Vec<IpAddressMapping>,
}

/// `PATCH /hsm/v2/Inventory/EthernetInterfaces/{id}`: what is given changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EthernetInterfacePatch {
    /// New description.
    #[serde(
        rename = "Description",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
    /// New component.
    #[serde(
        rename = "ComponentID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub component_id: Option<String>,
    /// New addresses (replacing the old).
    #[serde(
        rename = "IPAddresses",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ip_addresses: Option<Vec<IpAddressMapping>>,
}

/// Members of an SMD group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Their xnames.
    #[serde(default)]
    pub ids: Vec<String>,
}

/// An SMD group (`/hsm/v2/groups`): the group a node's cloud-init data
/// comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its name.
    pub label: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// SMD's exclusive-group name.
    #[serde(
        rename = "exclusiveGroup",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub exclusive_group: String,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Members.
    #[serde(default)]
    pub members: Members,
}

/// `POST /hsm/v2/groups/{label}/members`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAdd {
    /// The xname to add.
    pub id: String,
}

/// What SMD answers a creation with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUri {
    /// The new resource.
    #[serde(rename = "URI")]
    pub uri: String,
}

/// SMD's plain answer to a deletion or an update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// 0 on success.
    pub code: i64,
    /// What happened.
    pub message: String,
}

/// What cloud-init's `phone_home` module posts (form fields or JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneHome {
    /// DSA host key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pub_key_dsa: String,
    /// RSA host key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pub_key_rsa: String,
    /// ECDSA host key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pub_key_ecdsa: String,
    /// Ed25519 host key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pub_key_ed25519: String,
    /// The instance ID cloud-init ran with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
    /// The node's hostname.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// The node's FQDN.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fqdn: String,
}

impl PhoneHome {
    fn is_empty(&self) -> bool {
        *self == PhoneHome::default()
    }
}

/// BSS's `cloud-init` member of boot parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CloudInit {
    /// Meta-data merged into what the node gets.
    #[serde(rename = "meta-data", default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<CloudData>,
    /// User-data: an object rendered as `#cloud-config` YAML, or a string
    /// that is the document itself.
    #[serde(rename = "user-data", default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<serde_json::Value>,
    /// What the node last phoned home.
    #[serde(
        rename = "phone-home",
        default,
        skip_serializing_if = "PhoneHome::is_empty"
    )]
    pub phone_home: PhoneHome,
}

impl CloudInit {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == CloudInit::default()
    }
}

/// BSS boot parameters (`/boot/v1/bootparameters`): who (hosts, MACs,
/// NIDs) boots what (kernel, initrd, params) with which cloud-init data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootParams {
    /// xnames, or the special names `Default`, `Global`, `Unknown-<arch>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// MAC addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<String>,
    /// Node IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nids: Vec<i64>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    /// Kernel URL (`#sha256=HEX` may follow).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// Initrd URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initrd: String,
    /// cloud-init data.
    #[serde(
        rename = "cloud-init",
        default,
        skip_serializing_if = "CloudInit::is_empty"
    )]
    pub cloud_init: CloudInit,
}

/// A kernel or initrd in BSS's boot data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageData {
    /// Its URL.
    pub path: String,
    /// Parameters tied to the image.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
}

/// `bootscript?…&json=1`: BSS's boot data. As in BSS, `params` is the full
/// command line prefixed with `kernel ` (the image name iPXE gives it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootData {
    /// `kernel ` and the command line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub params: String,
    /// The kernel.
    #[serde(default)]
    pub kernel: ImageData,
    /// The initrd (empty path if none).
    #[serde(default)]
    pub initrd: ImageData,
}

/// `GET /boot/v1/service/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BssStatus {
    /// `running`.
    #[serde(rename = "bss-status")]
    pub bss_status: String,
}

/// How a cloud-init group file is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileEncoding {
    /// The content as is.
    #[default]
    Plain,
    /// Base64.
    Base64,
}

/// A group's cloud-config document, as OpenCHAMI cloud-init keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudConfigFile {
    /// The document (`#cloud-config …`).
    #[serde(default)]
    pub content: String,
    /// How `content` is encoded.
    #[serde(default)]
    pub encoding: FileEncoding,
}

/// A cloud-init group (`/cloud-init/admin/groups`): meta-data shown to its
/// members under `groups.<name>` and a cloud-config file their vendor-data
/// includes. Members are the SMD group of the same name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupData {
    /// The group's name (its SMD label).
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Meta-data for its members.
    #[serde(rename = "meta-data", default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<CloudData>,
    /// Its cloud-config document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<CloudConfigFile>,
}

/// One phone-home a node made, as `GET /cloud-init/phone-home` lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneHomeRecord {
    /// The node's xname, if it has a component.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub xname: String,
    /// The MAC it was known by, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The address it called from.
    pub source: String,
    /// When, RFC 3339.
    pub received: String,
    /// What it sent.
    pub data: PhoneHome,
}

/// RFC 7807 problem details, the body of every error answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank` for plain HTTP ones).
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What was wrong, naming the field.
    #[serde(default)]
    pub detail: String,
}

/// The node list `ochami discover static` reads, and `load` too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
}

/// One node of a [`NodeList`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Its name (its hostname).
    #[serde(default)]
    pub name: String,
    /// Node ID.
    #[serde(default)]
    pub nid: i64,
    /// Its xname.
    pub xname: String,
    /// Groups it belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Its BMC's xname (accepted and ignored: ferry has no BMCs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bmc: String,
    /// Its network interfaces.
    #[serde(default)]
    pub interfaces: Vec<InterfaceSpec>,
}

/// One interface of a [`NodeSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceSpec {
    /// The MAC address.
    pub mac_addr: String,
    /// Its addresses.
    #[serde(default)]
    pub ip_addrs: Vec<IpSpec>,
}

/// One address of an [`InterfaceSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpSpec {
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// The address.
    pub ip_addr: String,
}

/// What `load` did: counts per kind, created vs. already there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Components created or changed.
    pub components_created: usize,
    /// Components already as the list says.
    pub components_unchanged: usize,
    /// EthernetInterfaces created or changed.
    pub interfaces_created: usize,
    /// EthernetInterfaces already as the list says.
    pub interfaces_unchanged: usize,
    /// Groups created.
    pub groups_created: usize,
    /// Group memberships added.
    pub members_added: usize,
}

impl LoadReport {
    /// Everything created or changed.
    pub fn created(&self) -> usize {
        self.components_created + self.interfaces_created + self.groups_created + self.members_added
    }
}

/// Everything the service keeps, as written to its store: versioned so a
/// later ferry can read (or refuse) an older store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreState {
    /// [`STORE_VERSION`](crate::store::STORE_VERSION).
    pub version: u32,
    /// Components by xname.
    #[serde(default)]
    pub components: BTreeMap<String, Component>,
    /// EthernetInterfaces by ID.
    #[serde(default)]
    pub interfaces: BTreeMap<String, EthernetInterface>,
    /// SMD groups by label.
    #[serde(default)]
    pub groups: BTreeMap<String, Group>,
    /// Boot parameters by key: `mac:<mac>`, `host:<xname or name>`,
    /// `nid:<n>`; each entry has exactly one of hosts/macs/nids.
    #[serde(default)]
    pub boot: BTreeMap<String, BootParams>,
    /// cloud-init groups by name.
    #[serde(default)]
    pub cloud_init_groups: BTreeMap<String, GroupData>,
    /// Phone-homes, oldest first (the last 1000).
    #[serde(default)]
    pub phone_home: Vec<PhoneHomeRecord>,
}
