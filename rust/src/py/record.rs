//! [`record!`]: a small typed value crossing the seam from Rust to Python, instead of a
//! positional tuple: a frozen `#[pyclass]` with a read-only attribute per field, equality, a
//! constructor taking the fields in order, a readable `__repr__` (`Chunk(tensor=2, ...)`) and
//! pickling (so values can travel through `torch.distributed` object collectives).

/// Define a record class: `record! { /// doc  "PyName" RustName { /// doc  field: Type, ... } }`.
macro_rules! record {
    (
        $(#[$doc:meta])*
        $py_name:literal $name:ident {
            $( $(#[$field_doc:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$doc])*
        #[pyo3::pyclass(frozen, eq, from_py_object, module = "k2._native", name = $py_name)]
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$field_doc])* #[pyo3(get)] pub $field: $ty, )*
        }

        #[pyo3::pymethods]
        impl $name {
            #[new]
            fn new($($field: $ty),*) -> Self {
                Self { $($field),* }
            }

            fn __repr__(&self, py: pyo3::Python<'_>) -> pyo3::PyResult<String> {
                use pyo3::types::PyAnyMethods;
                use pyo3::IntoPyObjectExt;
                let fields: Vec<String> = vec![$(
                    format!(
                        "{}={}",
                        stringify!($field),
                        self.$field.clone().into_bound_py_any(py)?.repr()?
                    )
                ),*];
                Ok(format!("{}({})", $py_name, fields.join(", ")))
            }

            /// The constructor's arguments, for pickling.
            fn __getnewargs__(&self) -> ($($ty,)*) {
                ($(self.$field.clone(),)*)
            }
        }
    };
}

pub(crate) use record;
