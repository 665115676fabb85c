//! The label and field selectors of a list or watch request, parsed once and checked against
//! the kind's field labels.

use serde_json::Value;

use super::request::Query;
use crate::error::ApiError;
use crate::kinds;
use crate::registry::ResourceInfo;
use crate::selectors::{FieldSelector, LabelSelector};

/// Parsed list options shared by list and watch.
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

pub fn list_options(info: &ResourceInfo, query: &Query) -> Result<ListOptions, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    kinds::check_field_labels(info, fields.requirements.iter().map(|r| r.field.clone()))
        .map_err(ApiError::bad_request)?;
    Ok(ListOptions { labels, fields })
}

impl ListOptions {
    pub fn matches(&self, info: &ResourceInfo, object: &Value) -> bool {
        self.labels.matches_object(object)
            && (self.fields.is_empty()
                || self.fields.matches(&kinds::selectable_fields(info, object)))
    }
}
