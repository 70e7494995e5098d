---@meta
-- lab.plot: line plots drawn in pure Rust (PNG or SVG by the file's extension, embedded font).
-- Every table is strict: a misspelt key is an error naming it, inside each series and band too.

---@class lab.plot
lab.plot = {}

---@class PlotSeries
---@field name? string          Legend entry. Default "" (not in the legend).
---@field x number[]            Required. x values (on a log axis all > 0).
---@field y number[]            Required. y values, as many as x.
---@field yerr_low? number[]    Lower END of each error bar (absolute y, not a distance). Default none; give both or neither.
---@field yerr_high? number[]   Upper END of each error bar (absolute y). Default none.
---@field color? string         "#rrggbb", "#rgb", a tab10 name ("tab:blue", "orange"), "black" or "white". Default: the next tab10 colour.
---@field marker? "circle"|"square"|"triangle"|"diamond"|"none"  Default: circle, square, triangle, diamond in turn.
---@field line? "solid"|"dashed"|"dotted"|"none"  Default "solid".
---@field line_width? number    In pixels of a 1600x1000 figure. Default 4.5.
---@field marker_size? number   Marker radius in pixels of a 1600x1000 figure. Default 11.
---@field faint_x? number[]     Extra points drawn faintly in the series' colour and marker (e.g. seeds). Default {}.
---@field faint_y? number[]     Their y values, as many as faint_x. Default {}.

---@class PlotBand
---@field from number           Required. Start of the shaded x range.
---@field to number             Required. End of the shaded x range (> from).
---@field label? string         Written at the top of the band. Default none.
---@field color? string         Default "tab:red".
---@field alpha? number         Opacity in 0..1. Default 0.12.

---@class PlotSpec
---@field series PlotSeries[]   Required, at least one.
---@field title? string         Default none.
---@field caption? string       Small grey note under the x label. Default none.
---@field width? integer        Pixels. Default 1600.
---@field height? integer       Pixels. Default 1000.
---@field x_label? string       Default "".
---@field y_label? string       Default "".
---@field x_scale? "linear"|"log"|"symlog"  symlog is linear within [-x_linthresh, x_linthresh] (shows 0), log outside. Default "linear".
---@field y_scale? "linear"|"log"|"symlog"  Default "linear".
---@field x_linthresh? number   Linear half-width of a symlog x axis. Default 1.
---@field y_linthresh? number   Default 1.
---@field x_range? number[]     {low, high}. Default: the data plus a 5 % margin.
---@field y_range? number[]     {low, high}. Default: the data (error bars and faint points included) plus a 5 % margin.
---@field x_ticks? number[]     Tick positions. Default: round numbers (0 and decades on symlog, decades on log).
---@field y_ticks? number[]     Default: round numbers.
---@field x_tick_labels? string[]  One label per x tick. Default: the tick values.
---@field y_tick_labels? string[]  One label per y tick. Default: the tick values.
---@field legend? "best"|"upper right"|"upper left"|"lower left"|"lower right"|"center right"|"center left"|"lower center"|"upper center"|"center"|"none"  Default "best" (the place covering the fewest points).
---@field bands? PlotBand[]     Shaded x ranges. Default {}.

--- Draws a line plot and writes it to `path` (".png" or ".svg"; a list writes each), atomically,
--- creating parent folders. Errors name the series and field at fault.
---@param spec PlotSpec
---@param path string|string[]
function lab.plot.line(spec, path) end
