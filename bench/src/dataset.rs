//! The Maven CRM sample (`../shared/datasets/maven-crm`) the load is seeded
//! from: accounts, sales agents and products, with its known typos repaired.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Where the dataset lives unless `--dataset` says otherwise.
pub fn default_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/datasets/maven-crm"
    ))
}

#[derive(Debug, Clone, Deserialize)]
pub struct Account {
    #[serde(rename = "account")]
    pub name: String,
    pub sector: String,
    pub employees: u32,
    pub office_location: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Agent {
    #[serde(rename = "sales_agent")]
    pub name: String,
    pub regional_office: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    #[serde(rename = "product")]
    pub name: String,
    pub sales_price: u32,
}

/// What the load generator draws names, owners and amounts from.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub accounts: Vec<Account>,
    pub agents: Vec<Agent>,
    pub products: Vec<Product>,
}

impl Dataset {
    pub fn load(dir: &Path) -> anyhow::Result<Dataset> {
        let mut accounts: Vec<Account> = read(dir, "accounts.csv")?;
        for account in &mut accounts {
            account.sector = repair(&account.sector);
            account.office_location = repair(&account.office_location);
        }
        let dataset = Dataset {
            accounts,
            agents: read(dir, "sales_teams.csv")?,
            products: read(dir, "products.csv")?,
        };
        anyhow::ensure!(
            !dataset.accounts.is_empty()
                && !dataset.agents.is_empty()
                && !dataset.products.is_empty(),
            "{}: accounts, sales_teams and products must not be empty",
            dir.display()
        );
        Ok(dataset)
    }
}

/// The sample's misspellings, as the maven import test repairs them.
fn repair(value: &str) -> String {
    match value {
        "technolgy" => "technology".to_string(),
        "Philipines" => "Philippines".to_string(),
        other => other.to_string(),
    }
}

fn read<T: for<'de> Deserialize<'de>>(dir: &Path, file: &str) -> anyhow::Result<Vec<T>> {
    let path = dir.join(file);
    let mut reader = csv::Reader::from_path(&path)
        .with_context(|| format!("opening {} (pass --dataset)", path.display()))?;
    reader
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_loads_with_its_typos_repaired() {
        let data = Dataset::load(&default_dir()).expect("the dataset loads");
        assert_eq!(data.accounts.len(), 85);
        assert_eq!(data.agents.len(), 35);
        assert_eq!(data.products.len(), 7);
        assert!(data.accounts.iter().all(|a| a.sector != "technolgy"));
        assert!(data.accounts.iter().any(|a| a.sector == "technology"));
    }
}
