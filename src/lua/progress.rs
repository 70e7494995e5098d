//! `lab.progress`: a progress bar with ETA on a terminal, plain lines elsewhere.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::rc::Rc;

use indicatif::{ProgressBar, ProgressStyle};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

use super::opts::Opts;

pub struct Progress {
    bar: ProgressBar,
    label: String,
    total: u64,
    done: u64,
    /// Off a terminal the bar is hidden; each step is printed as a line instead.
    plain: bool,
}

#[derive(Clone)]
pub struct LuaProgress(Rc<RefCell<Progress>>);

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "new",
        lua.create_function(|lua, (total, opts): (u64, Value)| {
            let mut o = Opts::new("lab.progress.new", opts)?;
            let label: String = o.get_or(lua, "label", String::new())?;
            o.finish()?;
            let plain = !std::io::stderr().is_terminal();
            let bar = if plain { ProgressBar::hidden() } else { ProgressBar::new(total) };
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise} {msg}",
                )
                .map_err(mlua::Error::external)?
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            Ok(LuaProgress(Rc::new(RefCell::new(Progress { bar, label, total, done: 0, plain }))))
        })?,
    )?;
    Ok(m)
}

impl UserData for LuaProgress {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("inc", |_, this, (n, message): (Option<u64>, Option<String>)| {
            let mut p = this.0.borrow_mut();
            let n = n.unwrap_or(1);
            p.done += n;
            if let Some(m) = &message {
                p.bar.set_message(m.clone());
            }
            p.bar.inc(n);
            if p.plain {
                eprintln!("[{}] {}/{} {}", p.label, p.done, p.total, message.unwrap_or_default());
            }
            Ok(())
        });
        methods.add_method("message", |_, this, m: String| {
            this.0.borrow().bar.set_message(m);
            Ok(())
        });
        methods.add_method("finish", |_, this, ()| {
            this.0.borrow().bar.finish();
            Ok(())
        });
    }
}
