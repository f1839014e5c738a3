//! Masquerade of pod traffic leaving the cluster CIDR, in the plugin's own nftables table.
//!
//! Table `ip windlass-cni` holds one NAT base chain per pod subnet (`masq-10-244-1-0-24`, hook postrouting,
//! priority srcnat). Every ensure is one atomic `nft -j -f -` batch of "add table, add chain, flush chain, add
//! rule": the same batch applied twice (or by two concurrent ADDs) leaves exactly one rule, and no other table
//! is ever named. Ref: netavark's nftables driver (own table, one batch per change); the reference bridge
//! plugin's `ipMasq` (skip multicast, masquerade everything else outside the network).

use std::borrow::Cow;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

/// The table this plugin owns (DEFAULTS.md: CNI table `windlass-cni`, ip family).
pub const TABLE: &str = "windlass-cni";
/// Ref: nft(8) "srcnat" priority for NAT in postrouting.
const SRCNAT_PRIORITY: i32 = 100;
/// Multicast is link-local to the pod network, never masqueraded (as the bridge plugin's ipMasq).
const MULTICAST: &str = "224.0.0.0/4";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("nftables change for subnet {subnet} failed: {source}")]
    Apply {
        subnet: Ipv4Net,
        source: NftablesError,
    },
}

/// The chain owned by one pod subnet.
pub fn chain_name(subnet: Ipv4Net) -> String {
    format!(
        "masq-{}-{}",
        subnet.network().to_string().replace('.', "-"),
        subnet.prefix_len()
    )
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        handle: None,
    }
}

fn chain(subnet: Ipv4Net) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(chain_name(subnet)),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(SRCNAT_PRIORITY),
        ..Chain::default()
    }
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed(field),
        },
    )))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

/// The batch that makes `ip saddr <subnet> ip daddr != <cluster> ip daddr != 224.0.0.0/4 masquerade` the only
/// rule of the subnet's chain.
pub(crate) fn ensure_batch(subnet: Ipv4Net, cluster_cidr: Ipv4Net) -> Batch<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(chain(subnet)));
    batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(subnet))));
    let multicast: Ipv4Net = MULTICAST.parse().unwrap_or_else(|_| Ipv4Net::default());
    batch.add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Owned(chain_name(subnet)),
        expr: Cow::Owned(vec![
            Statement::Match(Match {
                left: ip_field("saddr"),
                right: prefix(subnet),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: ip_field("daddr"),
                right: prefix(cluster_cidr),
                op: Operator::NEQ,
            }),
            Statement::Match(Match {
                left: ip_field("daddr"),
                right: prefix(multicast),
                op: Operator::NEQ,
            }),
            Statement::Masquerade(None),
        ]),
        handle: None,
        index: None,
        comment: Some(Cow::Owned(format!(
            "windlass-cni: masquerade {subnet} leaving {cluster_cidr}"
        ))),
    }));
    batch
}

/// Makes sure traffic from `subnet` to outside `cluster_cidr` is masqueraded; idempotent and atomic.
pub fn ensure_masquerade(subnet: Ipv4Net, cluster_cidr: Ipv4Net) -> Result<(), MasqError> {
    let batch = ensure_batch(subnet, cluster_cidr).to_nftables();
    helper::apply_ruleset(&batch).map_err(|source| MasqError::Apply { subnet, source })
}

/// Removes the subnet's chain (node teardown, or GC when the network has no pods left).
pub fn remove_masquerade(subnet: Ipv4Net) -> Result<(), MasqError> {
    // "add table; add chain; delete chain" succeeds whether or not the chain existed.
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.add(NfListObject::Chain(chain(subnet)));
    batch.delete(NfListObject::Chain(chain(subnet)));
    helper::apply_ruleset(&batch.to_nftables())
        .map_err(|source| MasqError::Apply { subnet, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_only_names_our_table_and_flushes_before_adding() {
        let batch = ensure_batch(
            "10.244.1.0/24".parse().expect("net"),
            "10.244.0.0/16".parse().expect("net"),
        );
        let json = serde_json::to_value(batch.to_nftables()).expect("json");
        let text = json.to_string();
        let cmds = json["nftables"].as_array().expect("array");
        assert_eq!(cmds.len(), 4);
        assert!(cmds[2].get("flush").is_some(), "{text}");
        assert!(
            cmds[3]["add"]["rule"]["chain"] == "masq-10-244-1-0-24",
            "{text}"
        );
        for cmd in cmds {
            let obj = cmd
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|v| v.as_object());
            let inner = obj.and_then(|o| o.values().next()).expect("object");
            let table = inner
                .get("table")
                .or_else(|| inner.get("name"))
                .expect("table");
            assert!(
                table == TABLE || inner.get("table").is_some_and(|t| t == TABLE),
                "{text}"
            );
        }
    }
}
