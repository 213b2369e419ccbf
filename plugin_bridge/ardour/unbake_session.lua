-- Ardour 7, headless (ardour7-lua: the dummy audio backend): a session with a stereo track "song" and the
-- unbake VST3 on it; once a song is on the track (a region on its playlist), the track exported through
-- the master bus as float WAV.
--
--   ardour7-lua unbake_session.lua create DIR NAME RATE [PARAMETER=VALUE ...]
--       new session, track "song" (into the master bus), unbake as its first plugin, its parameters set
--       (by the names the plugin gives them: accompaniment_mute=1, vocals_gain_db=-6, ...), saved
--   ardour7-lua unbake_session.lua create-bare DIR NAME RATE
--       the same without a plugin
--   ardour7-lua unbake_session.lua export DIR NAME FOLDER FILE PRESET_UUID
--       load the session, export the session range (Ardour's simple export: freewheel, latency
--       compensated) with the export preset PRESET_UUID to FOLDER/FILE.wav
--
-- Lines that start with "UNBAKE " are what the caller reads; a failure prints "UNBAKE FAIL why", exits 1.

local function fail (why)
	print ("UNBAKE FAIL " .. why)
	os.exit (1)
end

local function unbake_on (route)
	local i = 0
	while true do
		local proc = route:nth_plugin (i)
		if proc:isnil () then return nil end
		if proc:display_name () == "unbake" then return proc end
		i = i + 1
	end
end

local function parameters (proc)
	-- label -> index of the plugin's parameters, as set_processor_param takes them
	local plug = proc:to_insert ():plugin (0)
	local out = {}
	for j = 0, plug:parameter_count () - 1 do
		out[plug:parameter_label (j)] = j
	end
	return out
end

local mode = arg[1]
if mode == "create" or mode == "create-bare" then
	local dir, name, rate = arg[2], arg[3], tonumber (arg[4])
	local s = create_session (dir, name, rate)
	if not s then fail ("create_session " .. dir) end
	local tl = s:new_audio_track (2, 2, nil, 1, "song", ARDOUR.PresentationInfo.max_order, ARDOUR.TrackMode.Normal, true)
	if tl:size () ~= 1 then fail ("new_audio_track") end
	local track = tl:front ()
	-- strict I/O, as the GUI's add-track dialog sets it by default (new_audio_track leaves it off): the
	-- plugin's outputs follow the track's two channels, its other output busses (if any) stay inactive
	track:set_strict_io (true)
	-- the track into the master bus, now (the session's auto-connect runs in a thread of its own,
	-- maybe after this script has saved)
	local out = track:output ()
	out:disconnect_all (nil)
	for c = 0, 1 do
		if out:audio (c):connect ("Master/audio_in " .. (c + 1)) ~= 0 then fail ("connect song -> Master") end
	end
	if mode == "create" then
		local proc = ARDOUR.LuaAPI.new_plugin (s, "unbake", ARDOUR.PluginType.VST3, "")
		if proc:isnil () then fail ("no VST3 plugin named unbake (is it on VST3_PATH, and scanned into the cache?)") end
		if track:add_processor_by_index (proc, 0, nil, true) ~= 0 then fail ("add_processor_by_index") end
		local ps = parameters (proc)
		for k = 5, #arg do
			local key, value = arg[k]:match ("^([^=]+)=(.*)$")
			local j = ps[key]
			if not j then fail ("no parameter " .. tostring (key)) end
			if not ARDOUR.LuaAPI.set_processor_param (proc, j, tonumber (value)) then
				fail ("set_processor_param " .. key .. "=" .. value)
			end
			local got = ARDOUR.LuaAPI.get_processor_param (proc, j, true)
			print (string.format ("UNBAKE PARAM %s %d %.9g", key, j, got))
		end
		print ("UNBAKE LATENCY " .. proc:signal_latency ())
	end
	s:save_state ("", false, false, false, false, false)
	close_session ()
	print ("UNBAKE CREATED " .. dir)

elseif mode == "export" then
	local dir, name, folder, file, preset = arg[2], arg[3], arg[4], arg[5], arg[6]
	local s = load_session (dir, name)
	if not s then fail ("load_session " .. dir) end
	local track = s:route_by_name ("song")
	if track:isnil () then fail ("no track song") end
	local range = s:locations ():session_range_location ()
	if not range then fail ("no session range") end
	local r0, r1 = range:start ():samples (), range:_end ():samples ()
	local block = s:get_block_size ()
	local proc = unbake_on (track)
	local latency = proc and proc:signal_latency () or 0
	local preroll = track:playback_latency ()
	print ("UNBAKE LATENCY " .. latency .. " PLAYBACK_LATENCY " .. preroll .. " BLOCK " .. block)
	print ("UNBAKE RANGE " .. r0 .. " " .. r1)
	local e = s:simple_export ()
	if not e:set_preset (preset) then fail ("no export preset " .. preset) end
	e:set_folder (folder)
	e:set_name (file)
	e:set_range (r0, r1)
	if not e:check_outputs () then fail ("no master outputs to export") end
	local t0 = os.time ()
	if not e:run_export () then fail ("run_export") end
	print ("UNBAKE EXPORTED " .. folder .. " in about " .. os.difftime (os.time (), t0) .. " s")
	close_session ()
else
	fail ("usage: create|create-bare|export ...")
end
quit ()
