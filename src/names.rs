//! One table of names per settings enum: [`names!`] writes its `as_str`, `NAMES`,
//! `Display` and `FromStr` (whose error is an [`Error::UnknownName`](crate::Error)).

/// `names!(Type, "what", Variant => "name" | "alias", …)`: `as_str` and `Display` give
/// each variant's name, `FromStr` reads the names and aliases, `NAMES` lists the names.
macro_rules! names {
    ($ty:ident, $what:literal, $($var:ident => $name:literal $(| $alias:literal)*),+ $(,)?) => {
        impl $ty {
            /// The names [`FromStr`](std::str::FromStr) reads (besides aliases), in order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The variant's name, as [`FromStr`](std::str::FromStr) reads it.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($ty::$var => $name,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = crate::Error;
            fn from_str(s: &str) -> crate::Result<Self> {
                match s {
                    $($name $(| $alias)* => Ok($ty::$var),)+
                    other => Err(crate::Error::unknown_name(
                        $what,
                        other,
                        $ty::NAMES.join(", "),
                    )),
                }
            }
        }
    };
}
