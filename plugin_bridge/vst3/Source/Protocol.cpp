#include "Protocol.h"

#include <msgpack.hpp>

namespace unbake::wire
{
namespace
{
using Packer = msgpack::packer<msgpack::sbuffer>;

void key (Packer& p, const char* k) { p.pack (std::string (k)); }

void common (Packer& p, const char* op, int64_t id)
{
    key (p, "v");  p.pack (kProtocolVersion);
    key (p, "op"); p.pack (std::string (op));
    key (p, "id"); p.pack (id);
}

std::string str (const msgpack::sbuffer& b) { return std::string (b.data(), b.size()); }
} // namespace

std::string hello (int64_t id, const std::string& client)
{
    msgpack::sbuffer b; Packer p (b);
    p.pack_map (4); common (p, "hello", id);
    key (p, "client"); p.pack (client);
    return str (b);
}

std::string open (int64_t id, const std::string& model, int sampleRate, int channels,
                  const std::vector<std::pair<std::string, double>>& options)
{
    msgpack::sbuffer b; Packer p (b);
    p.pack_map (options.empty() ? 6 : 7); common (p, "open", id);
    key (p, "model"); p.pack (model);
    key (p, "sample_rate"); p.pack (sampleRate);
    key (p, "channels"); p.pack (channels);
    if (! options.empty())
    {
        key (p, "options");
        p.pack_map ((uint32_t) options.size());
        for (const auto& [name, value] : options)
        {
            p.pack (name);
            p.pack (value); // a float64 (the engine takes int or float for these)
        }
    }
    return str (b);
}

std::string push (int64_t id, const std::string& session, int channels, int frames)
{
    msgpack::sbuffer b; Packer p (b);
    p.pack_map (6); common (p, "push", id);
    key (p, "session"); p.pack (session);
    key (p, "channels"); p.pack (channels);
    key (p, "frames"); p.pack (frames);
    return str (b);
}

std::string cancel (int64_t id, const std::string& session)
{
    msgpack::sbuffer b; Packer p (b);
    p.pack_map (4); common (p, "cancel", id);
    key (p, "session"); p.pack (session);
    return str (b);
}

Reply parseReply (const void* data, size_t size)
{
    Reply r;
    try
    {
        auto oh = msgpack::unpack (static_cast<const char*> (data), size);
        const auto& o = oh.get();
        if (o.type != msgpack::type::MAP)
            return r;

        bool versionOk = false;
        for (uint32_t i = 0; i < o.via.map.size; ++i)
        {
            const auto& kv = o.via.map.ptr[i];
            if (kv.key.type != msgpack::type::STR)
                continue;
            const std::string k (kv.key.via.str.ptr, kv.key.via.str.size);
            const auto& v = kv.val;
            const bool isInt = v.type == msgpack::type::POSITIVE_INTEGER || v.type == msgpack::type::NEGATIVE_INTEGER;
            auto asString = [&v] { return v.type == msgpack::type::STR ? std::string (v.via.str.ptr, v.via.str.size) : std::string(); };
            auto asInt = [&v, isInt] { return isInt ? v.as<int64_t>() : int64_t (-1); };

            if (k == "v")                    versionOk = isInt && v.as<int64_t>() == kProtocolVersion;
            else if (k == "kind")            r.kind = asString();
            else if (k == "re")              r.re = asInt();
            else if (k == "session")         r.session = asString();
            else if (k == "model")           r.model = asString();
            else if (k == "device")          r.device = asString();
            else if (k == "code")            r.code = asString();
            else if (k == "message")         r.message = asString();
            else if (k == "start")           r.start = asInt();
            else if (k == "frames")          r.frames = asInt();
            else if (k == "channels")        r.channels = asInt();
            else if (k == "latency_samples") r.latencySamples = asInt();
            else if (k == "sample_rate")     r.sampleRate = asInt();
            else if (k == "stems" && v.type == msgpack::type::ARRAY)
                for (uint32_t j = 0; j < v.via.array.size; ++j)
                    if (v.via.array.ptr[j].type == msgpack::type::STR)
                        r.stems.emplace_back (v.via.array.ptr[j].via.str.ptr, v.via.array.ptr[j].via.str.size);
        }
        r.valid = versionOk && ! r.kind.empty();
    }
    catch (const std::exception&)
    {
        r.valid = false;
    }
    return r;
}
} // namespace unbake::wire
